"""`csplade card FOLDER` and `csplade push FOLDER --repo-id OWNER/NAME`: share a trained encoder.

`card` writes the model card (README.md) of an encoder folder again from its files (settings, training
record, evaluation results; see csplade.model.card) and prints it; `push` uploads the folder to the
Hugging Face hub (its checkpoints and local card left out; the uploaded card names the repository).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from csplade.model.config import CONFIG_NAME


def register(sub: argparse._SubParsersAction) -> None:
    card = sub.add_parser("card", help="write the model card (README.md) of an encoder folder")
    card.add_argument("folder", help="a csplade encoder folder")
    card.set_defaults(func=_card)
    push = sub.add_parser("push", help="upload an encoder folder to the Hugging Face hub")
    push.add_argument("folder", help="a csplade encoder folder")
    push.add_argument("--repo-id", required=True, help="the hub repository, OWNER/NAME")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.set_defaults(func=_push)


def _card(args: argparse.Namespace) -> int:
    from csplade.model.card import write_card

    if not (Path(args.folder) / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{args.folder}: not a csplade encoder folder (no {CONFIG_NAME})")
    print(write_card(args.folder).read_text(encoding="utf-8"), end="")
    return 0


def _push(args: argparse.Namespace) -> int:
    from csplade.model.io import push_to_hub

    print(push_to_hub(args.folder, args.repo_id, private=args.private))
    return 0
