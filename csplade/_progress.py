"""Progress bars that suit where they are shown: redrawn in a terminal, sparse in a log file.

tqdm redraws its line at every refresh (10 a second). On a terminal that is one line; written to a
file (a cluster job's log, ``csplade eval ... 2> log``) every refresh is a line of its own, thousands
for one corpus. :func:`progress` is tqdm, refreshed at most every :data:`LOG_INTERVAL` seconds when
its stream is not a terminal (the first and the last state are always written).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL = 30.0  # seconds between two refreshes written to a file


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, refreshed at most every :data:`LOG_INTERVAL` seconds when its
    stream (``file``, default stderr) is not a terminal."""
    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        kwargs.setdefault("mininterval", LOG_INTERVAL)
    return tqdm(iterable, **kwargs)
