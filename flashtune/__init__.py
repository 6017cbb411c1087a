"""flashtune: cheap adaptation and fast inference for transformer language models."""

__version__ = "0.1.0"
