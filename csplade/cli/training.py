"""`csplade adapt RECIPE`, `csplade train RECIPE`, `csplade merge ADAPTER --out DIR`.

`adapt` and `train` read a recipe YAML whose keys are the dataclass field names of
csplade.training.arguments (and transformers.TrainingArguments); any `--key value` after the recipe overrides it. Both run under
`accelerate launch` unchanged (`accelerate launch --config_file accelerate_configs/zero3.yaml -m csplade
train RECIPE`). A recipe's ``eval_data`` is evaluated during training
(docs/evaluation-during-training.md).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    # The recipe and its overrides are not declared to argparse: they are whatever follows the verb
    # (argparse would otherwise take an override's value for the optional recipe).
    train = sub.add_parser(
        "train",
        help="contrastive training from a recipe",
        usage="csplade train [RECIPE.yaml] [--key value ...]",
        description="Train a sparse encoder. `--key value` pairs override recipe keys.",
    )
    train.set_defaults(func=_train, accepts_overrides=True)
    adapt = sub.add_parser(
        "adapt",
        help="adaptation phase (CLM + ReLU loss; MNTP for bi) from a recipe",
        usage="csplade adapt [RECIPE.yaml] [--key value ...]",
        description="Adapt a causal LM before contrastive training. `--key value` overrides.",
    )
    adapt.set_defaults(func=_adapt, accepts_overrides=True)
    merge = sub.add_parser("merge", help="merge a LoRA encoder into its base")
    merge.add_argument("adapter", help="a csplade encoder folder holding a LoRA adapter")
    merge.add_argument("--out", required=True, help="folder for the merged encoder")
    merge.set_defaults(func=_merge)


def split_recipe(args: list[str]) -> tuple[str | None, list[str]]:
    """`[RECIPE] --key value …` -> (recipe or None, overrides)."""
    if args and not args[0].startswith("-"):
        return args[0], list(args[1:])
    return None, list(args)


def _train(args: argparse.Namespace) -> int:
    from csplade.evaluation.during_training import RetrievalEvaluator
    from csplade.training.contrastive import run_training
    from csplade.training.recipe import parse_recipe

    model_args, loss_args, data_args, training_args = parse_recipe(*split_recipe(args.overrides))
    evaluator = RetrievalEvaluator.from_args(training_args)  # dev sets load before the model
    out = run_training(model_args, loss_args, data_args, training_args, evaluator=evaluator)
    if training_args.should_save:
        print(out)
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from csplade.evaluation.during_training import RetrievalEvaluator
    from csplade.training.adaptation import run_adaptation
    from csplade.training.recipe import ADAPT_TYPES, parse_recipe

    model_args, adapt_args, training_args = parse_recipe(
        *split_recipe(args.overrides),
        types=ADAPT_TYPES,
    )
    evaluator = RetrievalEvaluator.from_args(training_args)  # dev sets load before the model
    out = run_adaptation(model_args, adapt_args, training_args, evaluator=evaluator)
    if training_args.should_save:
        print(out)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from csplade.training.contrastive import merge_adapter

    print(merge_adapter(args.adapter, args.out))
    return 0
