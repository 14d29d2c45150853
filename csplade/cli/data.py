"""`csplade mine | teacher-scores`: training data from the command line.

    csplade mine --model bm25 --data DATA/scifact --split train --out groups.jsonl
    csplade teacher-scores --teachers minilm-dense,splade-tiny --groups groups.jsonl --out scored.jsonl

`mine` writes hard-negative training groups (:func:`csplade.data.mining.mine`); `teacher-scores` scores
every group with an ensemble of teachers for distillation (:func:`csplade.data.teachers.score_groups`).
"""

from __future__ import annotations

import argparse

from csplade.cli.common import add_batch_size, add_device, non_negative, number_list, positive
from csplade.data.ensemble import NORMALIZATIONS
from csplade.data.pseudo import PSEUDO_METHODS


def register(sub: argparse._SubParsersAction) -> None:
    _register_mine(sub)
    _register_teacher_scores(sub)


def _register_mine(sub) -> None:
    p = sub.add_parser(
        "mine",
        help="mine hard negatives (BM25, a csplade model, or a run) into training groups JSONL",
        description="Training groups for a BEIR split: judged positives, and negatives from the "
        "top of a retrieval run with every judged positive excluded (see csplade.data.mining).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="`bm25`, or a csplade model (folder or packaged name)")
    source.add_argument("--run", help="mine from an existing TREC run file instead")
    p.add_argument("--data", required=True, help="a BEIR folder, or a name under $CSPLADE_DATA")
    p.add_argument("--split", default="train", help="qrels split (default: train)")
    p.add_argument("--out", required=True, help="training groups JSONL to write")
    p.add_argument("--depth", type=positive, default=100, help="run ranks considered (100)")
    p.add_argument(
        "--negatives", type=positive, default=None, help="keep the N best-ranked (default: all)"
    )
    p.add_argument(
        "--skip-top", type=non_negative, default=0, help="skip the K first run ranks (0)"
    )
    p.add_argument(
        "--index-dir",
        default=None,
        help="model mining: keep the encoded corpus here and reuse it (default: a temp folder)",
    )
    p.add_argument(
        "--pseudo-queries",
        choices=PSEUDO_METHODS,
        default=None,
        help="instead of the split's judged queries: a document's title (title) or one of its "
        "sentences (sentence) as the query, the document as its positive (csplade.data.pseudo)",
    )
    p.add_argument(
        "--max-queries", type=positive, default=None, help="pseudo-queries: a random sample of N"
    )
    p.add_argument("--seed", type=non_negative, default=0, help="pseudo-queries: sampling seed")
    p.add_argument(
        "--hold-out",
        type=non_negative,
        default=0,
        help="leave out the split's first N judged queries (file order): those a dev slice of the "
        "same split evaluates on (eval_data `DATA:SPLIT`, eval_max_queries <= N)",
    )
    p.add_argument(
        "--drop-without-negatives",
        action="store_true",
        help="leave out (and count) the queries the run found no negative for, instead of writing "
        "them with none",
    )
    add_batch_size(p)
    add_device(p, default_help="the model's")
    p.set_defaults(func=_mine)


def _register_teacher_scores(sub) -> None:
    p = sub.add_parser(
        "teacher-scores",
        help="score training groups with teachers (dense, sparse, cross-encoder) for distillation",
    )
    p.add_argument(
        "--teachers",
        required=True,
        help="comma-separated teachers: packaged names (minilm-dense, splade-tiny), folders, hub ids",
    )
    p.add_argument(
        "--groups",
        required=True,
        help="training groups: JSONL, Parquet or Arrow (optionally gzipped), a save_to_disk "
        "folder or a hub id; csplade, Tevatron or sentence-transformers layout",
    )
    p.add_argument("--out", required=True, help="JSONL of scored groups")
    p.add_argument(
        "--weights",
        type=number_list,
        default=None,
        help="comma-separated ensemble weights >= 0, one per teacher (default: all 1)",
    )
    p.add_argument(
        "--normalization",
        default="minmax",
        choices=NORMALIZATIONS,
        help="per-query normalisation of each teacher before the weighted sum",
    )
    add_batch_size(p)
    add_device(p, default_help="cpu")
    p.set_defaults(func=_teacher_scores)


def _mine(args: argparse.Namespace) -> int:
    from csplade.data.mining import MiningOptions, mine

    options = MiningOptions(
        model=args.model,
        run_file=args.run,
        split=args.split,
        depth=args.depth,
        n_negatives=args.negatives,
        skip_top=args.skip_top,
        pseudo=args.pseudo_queries,
        max_queries=args.max_queries,
        seed=args.seed,
        hold_out=args.hold_out,
        drop_without_negatives=args.drop_without_negatives,
        index_dir=args.index_dir,
        batch_size=args.batch_size,
        device=args.device,
    )
    stats = mine(args.data, args.out, options)
    print(f"groups: {args.out}")
    for key, value in stats.items():
        print(f"{key}: {value}")
    return 0


def _teacher_scores(args: argparse.Namespace) -> int:
    from csplade.data.teachers import score_groups

    teachers = [t.strip() for t in args.teachers.split(",") if t.strip()]
    info = score_groups(
        args.groups,
        teachers,
        args.out,
        weights=args.weights,
        normalization=args.normalization,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(f"scored {info['groups']} groups with {', '.join(info['teachers'])} -> {args.out}")
    return 0
