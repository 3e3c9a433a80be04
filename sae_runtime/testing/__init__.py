"""Deterministic tiny models and SAEs for tests and the out-of-the-box `make serve`."""
