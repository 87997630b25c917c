"""Measuring tools that drive a running breeze-stream service from outside (load generators)."""
