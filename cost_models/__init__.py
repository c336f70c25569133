"""cost models."""
