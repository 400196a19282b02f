"""Serving a trained model: scoring raw rows (``predict``)."""
