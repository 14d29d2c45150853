"""`csplade <verb>`: the command line.

Each area of the library owns one module here that adds its verbs to the parser (`register(sub)`) and
turns parsed arguments into library calls. Printing happens only in this package; the library logs.
Verbs: backbone, encode, search, eval, export, mine, adapt, train, merge, card, push, teacher-scores,
quant-sweep, plan, demo (each module lists its own).

The parser answers at once: a verb module imports at its top only what its arguments need (argparse,
:mod:`csplade.cli.common`, names from light modules such as :mod:`csplade.model.config`), and each
verb's function imports the library modules it runs (torch, transformers, datasets…) when it runs.
This is the one place where csplade's own modules are imported inside functions, deliberately:
`csplade --help` and `csplade VERB --help` would otherwise load the whole stack (seconds).
"""

from __future__ import annotations

import argparse
import sys

from csplade import __version__, _logging

# Before the verb modules import torch, transformers, peft: the noise they print at import goes
# through these filters (shown with -v; see csplade._logging).
_logging.quiet_imports()

from csplade.cli import (  # noqa: E402
    backbone,
    data,
    demo,
    evaluate,
    index,
    model,
    plan,
    quant,
    training,
)

# Each module adds its verbs to the parser (`register(subparsers)`).
_VERB_MODULES = (backbone, index, evaluate, training, model, data, quant, plan, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csplade", description="Learned sparse retrieval on causal LLMs."
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, other libraries' messages and warnings, full tracebacks",
    )
    parser.add_argument("--version", action="version", version=f"csplade {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for module in _VERB_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _logging.configure(verbose=args.verbose)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "accepts_overrides", False):
        args.overrides = extra
    try:
        code = int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError, KeyError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"csplade {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    _close_process_group()
    return code


def _close_process_group() -> None:
    """After a verb that ran under `accelerate launch`: wait for every rank, then destroy the group.

    A process that exits with its process group alive can abort at interpreter exit (gloo's worker
    threads outlive the interpreter: "terminate called without an active exception", SIGABRT), which
    fails the whole launch after the work is done and saved.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
