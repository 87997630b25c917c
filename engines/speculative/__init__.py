"""Speculative decoding: draft sources (previous hypothesis, Medusa heads) and the heads' training."""
