"""csplade: learned sparse retrieval on causal LLMs.

`from csplade import SparseEncoder` is the entry point of the library; the heavy imports (torch,
transformers) happen on first use, so `csplade --help` stays fast.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["SparseEncoder", "SparseEncoderConfig", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("SparseEncoder", "SparseEncoderConfig"):
        import csplade.model as model

        return getattr(model, name)
    raise AttributeError(f"module 'csplade' has no attribute {name!r}")
