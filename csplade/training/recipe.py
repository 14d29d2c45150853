"""Recipes: a YAML file of keys plus `--key value` overrides, read into the recipe dataclasses.

Keys are exactly the field names of :mod:`csplade.training.arguments` and of
`transformers.TrainingArguments`; an unknown key (in the file or on the command line) is an error that
names the closest valid one. YAML scalars are converted with the type argparse would use.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from csplade.training.arguments import (
    AdaptationArguments,
    CspladeTrainingArguments,
    DataArguments,
    LossArguments,
    ModelArguments,
)

TRAIN_TYPES = (ModelArguments, LossArguments, DataArguments, CspladeTrainingArguments)
ADAPT_TYPES = (ModelArguments, AdaptationArguments, CspladeTrainingArguments)


def _all_fields(types: tuple[type, ...]) -> dict[str, type]:
    out: dict[str, type] = {}
    for cls in types:
        for f in dataclasses.fields(cls):
            if f.init:
                out[f.name] = cls
    return out


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_keys(keys: list[str], valid: dict[str, type], where: str) -> None:
    for key in keys:
        if key not in valid:
            raise ValueError(f"{where}: unknown key {key!r}{_suggest(key, sorted(valid))}")


def _coerce(parser: HfArgumentParser, key: str, value: Any) -> Any:
    """Convert a YAML scalar with the type argparse would use (YAML 1.1 reads 2e-5 as a string)."""
    action = next((a for a in parser._actions if a.dest == key), None)
    if action is None or action.type is None or not isinstance(value, str):
        return value
    try:
        return action.type(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"key {key!r}: cannot read {value!r} ({exc})") from exc


def parse_overrides(parser: HfArgumentParser, argv: list[str]) -> dict[str, Any]:
    """`--key value …` (or `--key=value`) into a dict with argparse's types; only the given keys."""
    valid = {a.dest for a in parser._actions if a.dest != "help"}
    quiet = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:
        if action.dest == "help":
            continue
        kwargs: dict[str, Any] = {"dest": action.dest, "default": argparse.SUPPRESS}
        if action.nargs is not None and action.nargs != 0:
            kwargs["nargs"] = action.nargs
            if action.nargs == "?":
                kwargs["const"] = action.const
        elif action.nargs == 0:  # store_true style
            kwargs["action"] = "store_const"
            kwargs["const"] = action.const
        if action.type is not None and action.nargs != 0:
            kwargs["type"] = action.type
        if action.choices is not None:
            kwargs["choices"] = action.choices
        quiet.add_argument(*action.option_strings, **kwargs)
    for token in argv:
        if token.startswith("--"):
            key = token[2:].split("=", 1)[0].replace("-", "_")
            if key not in valid:
                raise ValueError(f"command line: unknown key {key!r}{_suggest(key, sorted(valid))}")
    try:
        namespace, rest = quiet.parse_known_args(argv)
    except SystemExit as exc:
        raise ValueError(f"command line: cannot parse overrides {argv}") from exc
    if rest:
        raise ValueError(f"command line: unexpected arguments {rest}")
    return vars(namespace)


def parse_recipe(
    recipe: str | Path | None,
    overrides: list[str] | None = None,
    types: tuple[type, ...] = TRAIN_TYPES,
) -> tuple[Any, ...]:
    """Read a recipe YAML (or none) plus command-line overrides into instances of `types`."""
    data: dict[str, Any] = {}
    where = "recipe"
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} not found")
        where = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML ({exc})") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a recipe is a mapping of keys to values")
        data = loaded
    valid = _all_fields(types)
    _check_keys(list(data), valid, where)
    parser = HfArgumentParser(types)
    data = {k: _coerce(parser, k, v) for k, v in data.items()}
    data.update(parse_overrides(parser, overrides or []))
    try:
        return parser.parse_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
