"""No green by skipping: a package that `make test` installs missing (or broken) fails the suite.

The blocking is simulated in a child pytest with a plugin (`-p`) that makes one module unimportable
before conftest.py runs, as a dropped install step or a wheel that no longer resolves would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import NOT_INSTALLABLE_HERE, REQUIRED
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]

BLOCKER = """
import sys

BLOCKED = {blocked!r}


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
"""


def _makefile_extras() -> list[str]:
    makefile = (REPO / "Makefile").read_text()
    return re.search(r"^EXTRAS \?= (.+)$", makefile, re.M).group(1).split(",")


def test_every_package_make_test_installs_is_required():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    installed = {
        canonicalize_name(Requirement(req).name)
        for extra in _makefile_extras()
        for req in extras[extra]
    }
    required = {canonicalize_name(d) for d in REQUIRED}
    assert installed - required == set(), "add them to conftest.REQUIRED"
    assert required - installed == set(), "conftest.REQUIRED names what the set-up does not install"
    flash = {canonicalize_name(Requirement(r).name) for r in extras["flash"]}
    assert flash == NOT_INSTALLABLE_HERE and not flash & installed


def _child_pytest(tmp_path, *args: str, blocked=(), broken=()) -> subprocess.CompletedProcess:
    """pytest in a child process with `blocked` modules unfindable and `broken` ones shadowed by a
    package (first on its path) whose own import of a dependency fails."""
    (tmp_path / "block_imports.py").write_text(BLOCKER.format(blocked=set(blocked)))
    for module in broken:
        (tmp_path / module).mkdir()
        (tmp_path / module / "__init__.py").write_text(
            "import a_dependency_that_is_gone  # simulated by the test\n"
        )
    path = os.pathsep.join([str(tmp_path), str(REPO / "tests")])
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "block_imports", "-q", "-p", "no:cacheprovider",
         *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("module", ["deepspeed", "bitsandbytes", "sentence_transformers"])
def test_a_missing_required_package_fails_the_run_with_its_name(tmp_path, module):
    result = _child_pytest(tmp_path, "tests/test_lock.py", blocked=[module])
    out = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, out[-3000:]
    assert "packages that `make test` installs are missing" in out, out[-3000:]
    assert f"(import {module})" in out, out[-3000:]


def test_a_broken_required_package_fails_the_test_that_importorskips_it(tmp_path):
    """seismic found (so the start-up check passes) but its import failing on a missing dependency
    (a ModuleNotFoundError, which `pytest.importorskip` turns into a skip): the test fails, naming
    it, instead of skipping."""
    test = tmp_path / "test_uses_seismic.py"
    test.write_text("import pytest\n\ndef test_it():\n    pytest.importorskip('seismic')\n")
    # the test lies outside tests/, so conftest.py is loaded as a plugin
    result = _child_pytest(tmp_path, "-p", "conftest", str(test), broken=["seismic"])
    out = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, out[-3000:]
    assert "seismic is required by the tests but failed to import" in out, out[-3000:]
    assert "1 failed" in out, out[-3000:]
