"""csplade: learned sparse retrieval on causal LLMs."""

__version__ = "0.1.0"
