"""The sparse encoder: settings, token layout, backbone, head, saving and loading.

`from csplade.model import SparseEncoder` loads torch and transformers on first use only, so that its
light modules (config, backbones' names) serve the command line's `--help` without them.
"""

from typing import Any

__all__ = ["SparseEncoder", "SparseEncoderConfig"]


def __getattr__(name: str) -> Any:
    if name == "SparseEncoder":
        from csplade.model.encoder import SparseEncoder

        return SparseEncoder
    if name == "SparseEncoderConfig":
        from csplade.model.config import SparseEncoderConfig

        return SparseEncoderConfig
    raise AttributeError(f"module 'csplade.model' has no attribute {name!r}")
