"""Quantized inference: `modes` (names, packages, bytes), `loading` (what from_pretrained loads with).

The quantized LM head itself lives with the head: :mod:`csplade.model.head.quantized`.
"""
