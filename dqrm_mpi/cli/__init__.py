"""Console entry points (thin Click layers over the library)."""
