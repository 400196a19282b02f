"""On-disk dataset contract (schema), batch reader and synthetic data."""
