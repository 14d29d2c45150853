"""Evaluation during training: dev slices scored every ``eval_steps`` (learning curves, best checkpoint).

:class:`RetrievalEvaluator` is what the trainers (:class:`csplade.training.base.CheckpointingTrainer`)
call on the encoder as it is at a step, after sentence-transformers' SparseInformationRetrievalEvaluator
inside its trainer: for each dev set, encode its queries and documents, search the exact inverted index
(:mod:`csplade.index`), score the run with pytrec_eval (:mod:`csplade.evaluation.metrics`) and return
nDCG@10, R@100, MRR@10 and the mean non-zeros of query and document vectors, named
``<set>_<metric>`` (``scifact-test_ndcg@10``; the trainer logs them with ``eval_`` in front).

A dev set is a BEIR folder (or a name under $CSPLADE_DATA) and a split, sliced as ``csplade eval
--max-queries --max-docs`` slices (:func:`csplade.evaluation.beir_eval.slice_data`: the first judged
queries, every judged document of theirs plus others drawn at random, seed 0), so a score here equals
``csplade eval``'s on the same model and slice. A slice scores higher than the whole collection (its
distractors are fewer): compare curves with curves, and final models on whole collections.

Own vectors (``eval_own_vectors``): a model with a lexical residual (:mod:`csplade.model.lexical`) is
also evaluated with the residual off on both sides, logged as ``<set>_own_<metric>``: the LLM's own
vectors, the learned terms alone. For a ``lexical_docs`` model, whose documents are the residual alone
and never go through the model, the own evaluation encodes the documents through the model too (its
head, at ``eval_doc_max_length``) and the queries with their learned terms only: both sides are then
the model's, the same definition as for any other model, so the own curves of every recipe compare.
A model without a residual has only its own vectors: no separate evaluation.

Why in this layer and built by the caller: the evaluator reuses ``csplade eval``'s slicing, index and
scoring, which live here (csplade.training may not import csplade.evaluation). The trainers take it
as a callable, as sentence-transformers' trainer takes its evaluator; ``csplade train`` and ``csplade
adapt`` (:mod:`csplade.cli.training`) build it from the recipe's keys
(:class:`csplade.training.arguments.EvaluationArguments`) before any model loads, so a wrong data set
or split fails first, and a test can hand a trainer a scripted evaluator.

Known limits: every evaluation encodes the whole slice again (the model changed); the run is 100
documents deep (R@100 is the deepest metric); under DDP the main process evaluates alone while the
others wait.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from csplade._logging import muted
from csplade.data.beir import BeirData, find_dataset, load_beir
from csplade.evaluation.beir_eval import ranking_metrics, slice_data
from csplade.evaluation.metrics import sparsity_stats
from csplade.index import InvertedIndex
from csplade.model.encoder import SparseEncoder
from csplade.training.arguments import EvalSet

logger = logging.getLogger(__name__)

# pytrec_eval's name -> the name logged
METRICS = {"ndcg_cut_10": "ndcg@10", "recall_100": "recall@100", "recip_rank_10": "mrr@10"}
NNZ = ("query_nnz", "doc_nnz")
RUN_DEPTH = 100
_SHOWN = {"ndcg@10": "nDCG@10", "recall@100": "R@100", "mrr@10": "MRR@10"}


@dataclass(frozen=True)
class DevSet:
    """A dev set as evaluated: its log name, its (sliced) data and what the slice is."""

    name: str
    data: BeirData
    note: str | None  # None: the whole split


def load_dev_set(
    spec: EvalSet, max_queries: int | None = None, max_docs: int | None = None
) -> DevSet:
    """Load and slice one dev set; a missing data set or split is an error naming it."""
    data = load_beir(find_dataset(spec.data), split=spec.split)
    data, note = slice_data(data, max_docs, max_queries)
    logger.info("dev set %s: %s", spec.name, note or f"the whole {spec.split} split of {data.name}")
    return DevSet(spec.name, data, note)


class RetrievalEvaluator:
    """Scores an encoder on dev sets (module docstring); called by the trainer every ``eval_steps``."""

    def __init__(
        self,
        dev_sets: Sequence[DevSet],
        batch_size: int = 32,
        own_vectors: bool = False,
        doc_max_length: int | None = None,
    ) -> None:
        if not dev_sets:
            raise ValueError("no dev set to evaluate")
        names = [d.name for d in dev_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"two dev sets share a name: {names}")
        self.dev_sets = list(dev_sets)
        self.batch_size = batch_size
        self.own_vectors = own_vectors
        self.doc_max_length = doc_max_length
        self._said_own = False

    @classmethod
    def from_args(cls, args: Any) -> RetrievalEvaluator | None:
        """The evaluator a recipe asks for (its :class:`EvaluationArguments` keys), or None.

        Loads the dev sets now: a wrong name or split fails before any model loads.
        """
        sets = args.eval_sets() if hasattr(args, "eval_sets") else []
        if not sets:
            return None
        dev = [load_dev_set(s, args.eval_max_queries, args.eval_max_docs) for s in sets]
        best = getattr(args, "metric_for_best_model", None) or ""
        chosen = [s for s in sets if best.removeprefix("eval_").startswith(f"{s.name}_")]
        if args.load_best_model_at_end and any(s.split == "test" for s in chosen):
            logger.warning(
                "the best checkpoint is chosen on test judgments (%s): its scores on that test "
                "split are not a held-out measurement",
                chosen[0].name,
            )
        return cls(
            dev,
            batch_size=args.per_device_eval_batch_size,
            own_vectors=args.eval_own_vectors,
            doc_max_length=args.eval_doc_max_length,
        )

    def evaluates_own(self, encoder: SparseEncoder) -> bool:
        return self.own_vectors and encoder.config.lexical_residual

    def metric_names(self, encoder: SparseEncoder) -> list[str]:
        """The names :meth:`__call__` returns for `encoder` (without the trainer's ``eval_``)."""
        parts = [*METRICS.values(), *NNZ]
        prefixes = [d.name for d in self.dev_sets]
        if self.evaluates_own(encoder):
            prefixes += [f"{d.name}_own" for d in self.dev_sets]
        return [f"{prefix}_{part}" for prefix in prefixes for part in parts]

    def __call__(self, encoder: SparseEncoder) -> dict[str, float]:
        if self.own_vectors and not encoder.config.lexical_residual and not self._said_own:
            logger.info(
                "eval_own_vectors: the model has no lexical residual, its vectors are its own"
            )
            self._said_own = True
        out: dict[str, float] = {}
        config = encoder.config
        for dev in self.dev_sets:
            length = self.doc_max_length if not config.lexical_docs else None
            with _settings(encoder, doc_max_length=length):
                out.update(self.score(encoder, dev, dev.name))
            if self.evaluates_own(encoder):
                learned_only = dict(lexical_residual=False, lexical_docs=False,
                                    lexical_analyzer="tokens", doc_max_length=self.doc_max_length)  # fmt: skip
                with _settings(encoder, **learned_only):
                    out.update(self.score(encoder, dev, f"{dev.name}_own"))
        return out

    def score(self, encoder: SparseEncoder, dev: DevSet, prefix: str) -> dict[str, float]:
        """Encode, search and score one dev set: ``{prefix_metric: value}``."""
        data = dev.data
        query_ids = list(data.queries)
        with muted(SparseEncoder.__module__), muted(InvertedIndex.__module__):
            docs = encoder.encode_docs(
                data.doc_texts, batch_size=self.batch_size, show_progress=False
            )  # (D, V)
            queries = encoder.encode_queries(
                [data.queries[q] for q in query_ids],
                batch_size=self.batch_size,
                show_progress=False,
            )  # (Q, V)
            index = InvertedIndex.build(docs, data.doc_ids)
            result = ranking_metrics(data, index, queries, k=RUN_DEPTH, metrics=tuple(METRICS))
        values = {METRICS[k]: float(v) for k, v in result.items()}
        nnz = sparsity_stats(queries, docs)
        values.update({k: nnz[k] for k in NNZ})
        return {f"{prefix}_{k}": v for k, v in values.items()}

    def summary(self, metrics: dict[str, float]) -> str:
        """One line of an evaluation's metrics, per dev set (and its own vectors)."""
        parts = []
        for dev in self.dev_sets:
            for prefix, label in ((dev.name, dev.name), (f"{dev.name}_own", "own")):
                if f"{prefix}_ndcg@10" not in metrics:
                    continue
                shown = " ".join(f"{_SHOWN[m]} {metrics[f'{prefix}_{m}']:.4f}" for m in _SHOWN)
                nnz = f"nnz q {metrics[f'{prefix}_query_nnz']:.0f} d {metrics[f'{prefix}_doc_nnz']:.0f}"
                parts.append(f"{label} {shown} {nnz}")
        return "; ".join(parts)


@contextlib.contextmanager
def _settings(encoder: SparseEncoder, **overrides: Any) -> Iterator[None]:
    """The encoder with some settings changed inside the block (None: left as it is)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    saved = encoder.config
    encoder.config = replace(saved, **overrides)
    try:
        yield
    finally:
        encoder.config = saved
