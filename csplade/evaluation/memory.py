"""Peak memory of a block of work, above the level where it started: CUDA allocator or process RSS.

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory
  allocated at the start (tensors only; the CUDA context and the allocator's cache are not counted).
- CPU (Linux): the process's peak resident set size (VmHWM) minus the resident size at the start.
  The peak is reset by writing "5" to /proc/self/clear_refs (Linux >= 4.0), so earlier spikes
  (imports, loading a checkpoint) do not count. Where that file cannot be written but
  /proc/self/statm can be read, a thread samples the RSS every 5 ms instead (a shorter spike can be
  missed). Without /proc, ``getrusage``'s lifetime peak is used; when it was already above the
  start level (by 16 MiB or more), the figure may be that earlier peak, and ``floored`` says so.

RSS counts what the C allocator keeps mapped, not only live tensors: glibc keeps freed heap pieces
resident (benchmarks/_measure.py's ``spawn`` sets MALLOC_MMAP_THRESHOLD_ so large tensors are
unmapped when freed). Resetting VmHWM also resets ``getrusage``'s peak for the rest of the process:
:attr:`PeakMemory.lifetime_at_start` keeps the peak from before the reset.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

MIB = 1024**2
_FLOOR_SLACK = 16 * MIB  # a lifetime peak this far above the start level may hide the block's peak


def rss_bytes() -> int:
    """Current resident set size of this process (the lifetime peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return max_rss_bytes()


def max_rss_bytes() -> int:
    """Peak RSS of this process since it started, or since VmHWM was last reset (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; Linux: KiB


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def _statm_readable() -> bool:
    try:
        with open("/proc/self/statm") as f:
            return len(f.read().split()) > 1
    except OSError:
        return False


class _RssSampler:
    """Highest RSS seen by a thread that reads /proc/self/statm every `interval_s` seconds."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


@dataclass
class PeakMemory:
    """Peak memory between :meth:`start` and now, above the level at :meth:`start`.

    ``device`` "cuda…" reads the CUDA allocator, anything else the process RSS. ``method`` says how
    it was measured: "cuda", "vmhwm", "sampled" or "rusage". Use as ``PeakMemory(device).start()``
    then :meth:`peak_bytes`, or as a context manager (which also stops a sampling thread).
    """

    device: str = "cpu"
    base: int = 0  # bytes at start(): allocated (CUDA) or resident (CPU)
    method: str = ""
    floored: bool = False  # "rusage" only: the figure may be an earlier, higher peak
    lifetime_at_start: int = 0  # the process's RSS peak before start() reset it
    _sampler: Any = field(default=None, repr=False)

    @property
    def reset_ok(self) -> bool:
        """True when the figure counts this block only (CUDA stats, a reset VmHWM, or sampling)."""
        return self.method != "rusage"

    def start(self) -> PeakMemory:
        self.lifetime_at_start = max_rss_bytes()
        if self.device.startswith("cuda"):
            import torch  # imported only here: a CPU measurement needs no torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "cuda"
            return self
        if _reset_peak_rss():
            self.method = "vmhwm"
        elif _statm_readable():
            self.method = "sampled"
            self._sampler = _RssSampler()
        else:
            self.method = "rusage"
        self.base = rss_bytes()
        self.floored = self.method == "rusage" and max_rss_bytes() > self.base + _FLOOR_SLACK
        return self

    def peak_total(self) -> int:
        """The peak since :meth:`start`, in absolute bytes (resident, or allocated on CUDA)."""
        if self.method == "cuda":
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self.method == "vmhwm":
            return _vm_hwm_bytes()
        if self.method == "sampled":
            return max(self._sampler.peak, rss_bytes())
        return max_rss_bytes()

    def peak_bytes(self) -> int:
        """The peak since :meth:`start` minus the level at :meth:`start`."""
        return self.peak_total() - self.base

    def lifetime_peak(self) -> int:
        """The process's RSS peak since it started, the part before :meth:`start` included."""
        return max(self.lifetime_at_start, max_rss_bytes())

    def stop(self) -> None:
        """End the sampling thread, if any (the figures stay readable)."""
        if self._sampler is not None:
            self._sampler.stop()

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
