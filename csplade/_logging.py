"""The command line's logging: csplade's own lines, and third-party noise kept out of them.

By default `csplade` shows progress bars, its own INFO lines (one per stage) and results; other
libraries' lines only from WARNING up, minus the noisy *sources* below, whose lines say nothing to a
csplade user; ``-v`` shows everything (csplade at DEBUG, the others at INFO, what was held replayed
first). Noise is recognised by where it comes from (logger name, emitting module, warning category and
module), never by its wording, so a reworded message from the same place stays hidden:

============================  ==============  ================================================
source (logger prefix)        held below      what it prints (examples, when)
============================  ==============  ================================================
``torchao``                   ERROR           extension builds for another Python/CUDA, "no
                                              triton" (import, through transformers' quantizers)
``torch.utils._pytree``       ERROR           Enum ``register_constant`` deprecation (torchao
                                              import)
``bitsandbytes``              ERROR           CPU kernel lookups (import, through peft)
``kernels``                   ERROR           hub checks skipped offline (bitsandbytes' import)
``DeepSpeed``, module         ERROR           "Setting accelerator to CPU" (first save or
``real_accelerator``                          Trainer on CPU)
============================  ==============  ================================================

Warnings: DeprecationWarning / PendingDeprecationWarning / FutureWarning from any module outside
csplade, and UserWarning from ``torch.utils.data`` (pinned memory without an accelerator).

Before any handler exists (at import, or when ``--help`` exits inside the parser) Python prints
records through ``logging.lastResort``; some sources print through a handler of their own (torch's,
DeepSpeed's). :func:`quiet_imports`, run first thing in :mod:`csplade.cli`, puts the source filter on
``lastResort`` and on each source's own logger; :func:`configure` puts it on the CLI's handler once the
arguments are parsed. The library itself never calls either (it only logs to ``logging.getLogger(__name__)``).
:func:`muted` lowers one logger for a block (per-call INFO lines of a loop).
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# logger prefix -> (emitting module or None for any, level below which its records are held)
NOISY_SOURCES: dict[str, tuple[str | None, int]] = {
    "torchao": (None, logging.ERROR),
    "torch.utils._pytree": (None, logging.ERROR),
    "bitsandbytes": (None, logging.ERROR),
    "kernels": (None, logging.ERROR),
    "DeepSpeed": ("real_accelerator", logging.ERROR),
}
NOISY_WARNINGS = (
    (DeprecationWarning, r"(?!csplade)"),
    (PendingDeprecationWarning, r"(?!csplade)"),
    (FutureWarning, r"(?!csplade)"),
    (UserWarning, r"torch\.utils\.data\."),
)
VERBOSE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MAX_KEPT = 200  # held records kept for -v to replay


def noisy(record: logging.LogRecord) -> bool:
    """True when `record` comes from one of :data:`NOISY_SOURCES` below its level."""
    for prefix, (module, below) in NOISY_SOURCES.items():
        if record.name == prefix or record.name.startswith(prefix + "."):
            return record.levelno < below and (module is None or record.module == module)
    return False


class SourceFilter(logging.Filter):
    """Holds the records of noisy sources (dropped from the output, kept for -v to replay)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if not noisy(record):
            return True
        if len(self.held) < _MAX_KEPT and record not in self.held:
            self.held.append(record)
        return False


_FILTER = SourceFilter()
_ATTACHED: list[logging.Filterer] = []


def _attach(target: logging.Filterer) -> None:
    if target not in _ATTACHED:
        target.addFilter(_FILTER)
        _ATTACHED.append(target)


def quiet_imports() -> None:
    """Hold the noisy sources' records printed before the CLI's handler exists (idempotent).

    Call before importing torch / transformers / peft: most of the noise is printed at import.
    """
    _attach(logging.lastResort)
    for name in NOISY_SOURCES:  # records logged on the source itself, whatever handler prints them
        _attach(logging.getLogger(name))


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
    if not verbose:
        handler.addFilter(_FILTER)
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
    for category, module in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", category=category, module=module)


def _release() -> None:
    """Detach the source filter and replay what it held (for -v)."""
    for target in _ATTACHED:
        target.removeFilter(_FILTER)
    _ATTACHED.clear()
    held, _FILTER.held = _FILTER.held, []
    for record in held:
        logging.getLogger(record.name).handle(record)


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
