"""Arguments several verbs share, declared once: model loading, device, dtype, batch size, numbers.

Every numeric argument is checked by argparse itself (a `type=` below), so a wrong value is refused
with its allowed range before any work starts.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from csplade.model.config import DTYPES


def _number(kind: type, low: float, strict: bool, what: str) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


positive = _number(int, 1, False, "a positive integer")
non_negative = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a number > 0")
non_negative_float = _number(float, 0.0, False, "a number >= 0")


def add_device(p: argparse.ArgumentParser, default_help: str = "accelerate's") -> None:
    p.add_argument("--device", default=None, help=f"cpu, cuda, cuda:1 … (default: {default_help})")


def add_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="backbone dtype (default: the model's)"
    )


def add_batch_size(p: argparse.ArgumentParser, default: int = 32, what: str = "texts") -> None:
    p.add_argument(
        "--batch-size", type=positive, default=default, help=f"{what} per forward pass ({default})"
    )


def add_model_loading(p: argparse.ArgumentParser, batch_what: str = "texts") -> None:
    """--device, --dtype and --batch-size: how a model is loaded and run."""
    add_device(p)
    add_dtype(p)
    add_batch_size(p, what=batch_what)


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


fraction.__name__ = "a number in (0, 1]"


def number_list(text: str) -> list[float]:
    """Comma-separated numbers >= 0 (e.g. ensemble weights: 1,0.5)."""
    values = [part.strip() for part in text.split(",")]
    if not values or not all(values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0, got {text!r}")
    return [non_negative_float(v) for v in values]


number_list.__name__ = "comma-separated numbers >= 0"

# The argparse types above: every numeric flag of every verb uses one of them (a test checks).
NUMERIC_TYPES = (positive, non_negative, positive_float, non_negative_float, fraction, number_list)
