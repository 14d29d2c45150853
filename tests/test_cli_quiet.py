"""A quiet, informative command line: every numeric flag is checked at parsing, `--version`, and the
default stderr of `csplade eval` holds csplade's own lines and progress bars, no third-party noise."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

from csplade import __version__
from csplade.cli import build_parser
from csplade.cli.common import (
    NUMERIC_TYPES,
    fraction,
    non_negative,
    non_negative_float,
    number_list,
    positive,
    positive_float,
)
from csplade.cli.plan import memory_size
from csplade.cli.quant import _modes

# What each numeric type must do with "0" (True: accepted); "-1", "abc", "nan" are always refused.
ZERO_ACCEPTED = {
    positive: False,
    non_negative: True,
    positive_float: False,
    non_negative_float: True,
    fraction: False,
    number_list: True,
}
NOT_NUMERIC = (memory_size, _modes)  # checked types that read other text (80GB, mode lists)


def _verbs(parser: argparse.ArgumentParser):
    """(name, parser) of every verb, nested ones (backbone prepare) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for nested, deeper in _verbs(sub):
                    yield f"{name} {nested}", deeper


def _required_argv(parser: argparse.ArgumentParser) -> list[str]:
    """The least argv that satisfies `parser`'s required arguments (placeholder strings)."""
    argv: list[str] = []
    for action in parser._actions:
        value = next(iter(action.choices)) if action.choices else "x"
        if action.option_strings and action.required:
            argv += [action.option_strings[0], value]
        elif not action.option_strings and not isinstance(action, argparse._SubParsersAction):
            argv.append(value)
    for group in parser._mutually_exclusive_groups:
        if group.required:
            argv += [group._group_actions[0].option_strings[0], "x"]
    return argv


def test_every_numeric_flag_refuses_zero_negative_and_text_at_parsing(capsys):
    parser = build_parser()
    checked = 0
    for verb, sub in _verbs(parser):
        base = [*verb.split(), *_required_argv(sub)]
        if any(a.type in NUMERIC_TYPES for a in sub._actions):
            parser.parse_known_args(base)  # the placeholders alone parse
        for action in sub._actions:
            if action.type is None or action.type in NOT_NUMERIC:
                continue
            flag = action.option_strings[0]
            assert action.type in NUMERIC_TYPES, (
                f"csplade {verb} {flag}: type {action.type!r} is not one of csplade.cli.common's "
                "checked types (positive, non_negative, positive_float, fraction, …)"
            )
            for value in ("-1", "abc", "nan", "0"):
                accepted = value == "0" and ZERO_ACCEPTED[action.type]
                if accepted:
                    parsed = parser.parse_known_args([*base, flag, value])[0]
                    assert parsed.__dict__[action.dest] in (0, [0.0]), (verb, flag)
                    continue
                with pytest.raises(SystemExit) as exit_info:
                    parser.parse_known_args([*base, flag, value])
                assert exit_info.value.code == 2, (verb, flag, value)
                err = capsys.readouterr().err
                assert f"argument {flag}" in err and "expected" in err, (verb, flag, value, err)
            checked += 1
    assert (
        checked >= 30
    )  # encode, search (+ Seismic), eval, mine, quant-sweep, plan, teacher-scores


def test_latency_queries_zero_means_no_latency_measurement():
    args = build_parser().parse_args(
        ["eval", "--model", "m", "--datasets", "d", "--out", "o", "--latency-queries", "0"]
    )
    assert args.latency_queries == 0


def test_version():
    result = subprocess.run(
        [sys.executable, "-m", "csplade", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == f"csplade {__version__}"


NOISE = re.compile(
    r"Failed to load|kernels-community|Setting accelerator|register_constant|triton"
    r"|Warning|WARNING|^[WE]\d{4} |warnings\.warn|Traceback"
)
PROGRESS = re.compile(r"%\||\[\d\d:\d\d[<,]")  # tqdm bars (in place, with \r)


@pytest.mark.slow
def test_default_stderr_of_eval_on_adi_holds_no_third_party_noise(adi, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": ""}
    result = subprocess.run(
        [sys.executable, "-m", "csplade", "eval", "--model", "splade-tiny", "--datasets",
         str(adi), "--baseline", "bm25", "--out", str(tmp_path / "eval"), "--latency-queries",
         "20"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [part for line in result.stderr.splitlines() for part in line.split("\r")]
    noise = [line for line in lines if NOISE.search(line)]
    assert not noise, "\n".join(noise)
    own = [line for line in lines if line.strip() and not PROGRESS.search(line)]
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in own), "\n".join(own)
    assert sum("truncated" in line for line in own) <= 2  # once per encode call, not per query
    assert any("splade-tiny on adi: nDCG@10" in line for line in own)
    assert "| adi |" in result.stdout and not NOISE.search(result.stdout)


def test_noise_is_held_by_source_and_replayed_with_verbose(capsys):
    """Noise is recognised by its source, not its wording: any message of a noisy source (here
    reworded ones) is held by default and shown with -v; other libraries' warnings still show."""
    import logging

    from csplade import _logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        # as in the CLI before configure(): no handler on the root, Python's lastResort prints
        for handler in handlers:
            root.removeHandler(handler)
        _logging.quiet_imports()
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: reworded")
        logging.getLogger("kernels._internals.hf_hub").warning("a reworded offline note")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another kernel lookup")
        _logging.configure(verbose=False)
        logging.getLogger("torchao").error("a real torchao error")
        logging.getLogger("csplade.test").info("stage done")
        logging.getLogger("bm25s").info("a third-party info line")
        logging.getLogger("kernels.cli").warning("noise after the handler exists")
        logging.getLogger("bm25s.tokenization").warning("a real third-party warning")
        err = capsys.readouterr().err
        for hidden in ("Failed to load", "reworded offline", "kernel lookup", "after the handler",
                       "a third-party info line"):  # fmt: skip
            assert hidden not in err, hidden
        assert "a real torchao error" in err  # errors of a noisy source are never held
        assert "warning (bm25s.tokenization): a real third-party warning" in err
        assert re.search(r"^\d\d:\d\d:\d\d stage done$", err, re.MULTILINE)
        _logging.configure(verbose=True)  # -v: the held noise is shown after all
        err = capsys.readouterr().err
        assert "WARNING torchao: Failed to load /x/_C_mxfp8.so" in err
        assert "WARNING kernels._internals.hf_hub: a reworded offline note" in err
        assert "WARNING kernels.cli: noise after the handler exists" in err
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        _logging.quiet_imports()  # back to the state importing csplade.cli leaves


def test_a_noisy_source_is_held_only_from_its_own_module():
    import logging

    from csplade._logging import noisy

    def record(name, module, level=logging.WARNING):
        rec = logging.LogRecord(name, level, f"{module}.py", 1, "Setting something", None, None)
        return rec

    assert noisy(record("DeepSpeed", "real_accelerator"))
    assert not noisy(record("DeepSpeed", "engine"))  # DeepSpeed's other warnings show
    assert not noisy(record("kernelsx", "m"))  # a prefix, not a substring
    assert noisy(record("kernels.x", "m", logging.INFO))


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"], ["train", "--help"]])
def test_help_prints_nothing_on_stderr(argv):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": ""}
    result = subprocess.run(
        [sys.executable, "-m", "csplade", *argv], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0 and "usage: csplade" in result.stdout
    assert result.stderr == "", result.stderr


HEAVY = ("torch", "transformers", "datasets", "accelerate", "peft", "deepspeed", "bitsandbytes")


def test_help_loads_no_heavy_package():
    """`csplade --help` and `csplade VERB --help` answer without torch, transformers and the rest:
    every verb imports the library modules it runs only when it runs (csplade.cli)."""
    verbs = sorted({name.split()[0] for name, _ in _verbs(build_parser())})
    probe = (
        "import sys, contextlib, io\n"
        "from csplade.cli import main\n"
        f"heavy = {HEAVY!r}\n"
        "for argv in [[]] + [[v] for v in sys.argv[1:]]:\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main([*argv, '--help'])\n"
        "    loaded = sorted(m for m in heavy if m in sys.modules)\n"
        "    assert not loaded, (argv, loaded)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", probe, *verbs], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(verbs) >= 15


def test_progress_bars_refresh_a_log_file_sparsely():
    """Without a terminal (a log file) a bar is refreshed at most every LOG_INTERVAL seconds, so a
    long loop writes a few states, not one line per update; a terminal keeps tqdm's refresh."""
    import io

    from csplade._progress import LOG_INTERVAL, progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    log = io.StringIO()
    with progress(total=100_000, file=log, desc="docs") as bar:
        assert bar.mininterval == LOG_INTERVAL
        for _ in range(100_000):
            bar.update(1)
    assert log.getvalue().count("\r") <= 3 and "100000/100000" in log.getvalue()
    with progress(total=1, file=Terminal()) as bar:
        assert bar.mininterval == 0.1
