"""Quantized inference: `modes` (names, packages, bytes), `lm_head`, `loading` (from_pretrained)."""
