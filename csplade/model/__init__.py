"""The sparse encoder: settings, token layout, backbone, head, saving and loading."""

from csplade.model.config import SparseEncoderConfig
from csplade.model.encoder import SparseEncoder

__all__ = ["SparseEncoder", "SparseEncoderConfig"]
