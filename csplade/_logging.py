"""The command line's logging: csplade's own lines, and third-party noise kept out of them.

By default `csplade` shows progress bars, its own INFO lines (one per stage) and results; other
libraries' lines only from WARNING up, minus the known noise below, which says nothing to a csplade
user; ``-v`` shows everything (csplade at DEBUG, the others at INFO, the noise included, the noise
already dropped at import replayed first). Where each message comes from:

==========================================================  =========================================
message                                                     emitted by (when)
==========================================================  =========================================
``Failed to load …/torchao/_C….so``                          logger ``torchao`` when torchao is imported
                                                            (transformers' quantizer registry imports
                                                            it): extension builds for another
                                                            Python/CUDA, unused on this path
``Detected no triton``                                      logger ``torchao.kernel.intmm`` (import)
``<enum …> is an Enum subclass … register_constant()``      logger ``torch.utils._pytree``, called by
                                                            torchao at import
``Failed to load CPU gemm_4bit_forward from kernels-…``     logger ``bitsandbytes.backends.cpu.ops``,
                                                            bitsandbytes imported by peft
``Setting accelerator to CPU``                              logger ``DeepSpeed`` (its own handler), on
                                                            the first model save or Trainer
``is_gradient_checkpointing is deprecated``                 FutureWarning, transformers, when peft
                                                            wraps a model in LoRA
``'pin_memory' … no accelerator is found``                  UserWarning, torch's DataLoader, training
                                                            on CPU
other DeprecationWarning / FutureWarning                    third-party modules
==========================================================  =========================================

The logger filters must be in place before those imports: :func:`quiet_imports` runs first thing in
:mod:`csplade.cli`, :func:`configure` once the arguments are parsed. The library itself never calls
either (it only logs to ``logging.getLogger(__name__)``). :func:`muted` lowers one logger for a block
(per-call INFO lines of a loop).
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# logger name -> patterns of its messages that are noise (see the module docstring)
NOISE = {
    "torchao": (r"^Failed to load .*\.so",),
    "torchao.kernel.intmm": (r"Detected no triton",),
    "torch.utils._pytree": (r"register_constant\(\) on Enum subclasses is deprecated",),
    "bitsandbytes.backends.cpu.ops": (r"kernels-community",),
    "DeepSpeed": (r"Setting accelerator to CPU",),
}
NOISY_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
)
VERBOSE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MAX_KEPT = 200  # dropped records kept for -v to replay


class NoiseFilter(logging.Filter):
    """Drops a logger's records whose message matches one of `patterns`, keeping them for -v."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]
        self.dropped: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(p.search(message) for p in self.patterns):
            if len(self.dropped) < _MAX_KEPT:
                self.dropped.append(record)
            return False
        return True


_FILTERS: dict[str, NoiseFilter] = {}


def quiet_imports() -> None:
    """Attach the noise filters to the loggers of the NOISE table (idempotent).

    Call before importing torch / transformers / peft: most of the noise is printed at import.
    """
    for name, patterns in NOISE.items():
        if name not in _FILTERS:
            _FILTERS[name] = NoiseFilter(patterns)
            logging.getLogger(name).addFilter(_FILTERS[name])


def _ours(record: logging.LogRecord) -> bool:
    return record.name == "csplade" or record.name.startswith(("csplade.", "__main__"))


class _ThirdPartyThreshold(logging.Filter):
    """On the root handler: csplade's records from `ours` up, the others from `others` up."""

    def __init__(self, ours: int, others: int) -> None:
        super().__init__()
        self.ours, self.others = ours, others

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= (self.ours if _ours(record) else self.others)


class ShortFormatter(logging.Formatter):
    """``12:00:00 message`` for csplade's INFO lines; the level, and the source when it is another
    library, for the rest (``12:00:00 warning: …``, ``12:00:00 warning (transformers): …``)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno == logging.INFO and _ours(record):
            return text
        level = record.levelname.lower()
        label = level if _ours(record) else f"{level} ({record.name})"
        stamp, _, message = text.partition(" ")
        return f"{stamp} {label}: {message}"


def configure(verbose: bool = False) -> None:
    """The CLI's logging: a stderr handler on the root logger; warnings filtered unless `verbose`."""
    quiet_imports()
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter(VERBOSE_FORMAT, "%H:%M:%S") if verbose else ShortFormatter()
    handler.setFormatter(formatter)
    ours, others = (logging.DEBUG, logging.INFO) if verbose else (logging.INFO, logging.WARNING)
    handler.addFilter(_ThirdPartyThreshold(ours, others))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_csplade", False)]:
        root.removeHandler(old)
    handler._csplade = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    if verbose:
        _release()
        warnings.simplefilter("default")
        return
    for category, pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(?!csplade)")


def _release() -> None:
    """Detach the noise filters and replay what they dropped (for -v)."""
    for name, noise in _FILTERS.items():
        logger = logging.getLogger(name)
        logger.removeFilter(noise)
        for record in noise.dropped:
            logger.handle(record)
        noise.dropped.clear()
    _FILTERS.clear()


@contextmanager
def muted(name: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise logger `name` to `level` inside the block (e.g. per-call INFO lines of a timed loop)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(max(level, before))
    try:
        yield
    finally:
        logger.setLevel(before)
