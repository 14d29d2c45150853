"""What the encoder takes from the training data before contrastive training starts.

Each step is owned by its layer: the data layer picks the texts (:mod:`csplade.data.texts`), the model
fits itself on them (:class:`~csplade.model.encoder.SparseEncoder`), and this module only says which
steps a recipe asks for, in order:

1. the lexical residual's IDF and document lengths (``lexical_residual``, when the model has none);
2. the per-term head bias (``head_bias_df``), on training documents and queries;
3. the IDF over the model's tokens (``doc_only`` query weights, ``doc_regularizer: idf_flops``).

and for the adaptation phase (``csplade adapt``): its texts, the lexical objective's inputs
(:func:`lexical_setup`) and the head-bias calibration on the texts.
"""

from __future__ import annotations

import logging

import torch

from csplade.data.lexical_targets import LexicalTargets, fit_statistics
from csplade.data.texts import (
    calibration_documents,
    document_texts,
    query_length_spans,
    query_texts,
    read_texts,
)
from csplade.model.encoder import SparseEncoder
from csplade.training.arguments import AdaptationArguments, LossArguments, ModelArguments
from csplade.training.distributed import gathered

logger = logging.getLogger(__name__)


def fit_to_training_data(
    encoder: SparseEncoder, dataset, model_args: ModelArguments, loss_args: LossArguments
) -> torch.Tensor | None:
    """Run the steps the recipe asks for on `dataset` (module docstring); returns the IDF the loss
    needs (``idf_flops``), else None. Every process computes the same."""
    if model_args.lexical_residual and encoder.lexical is None:
        encoder.fit_lexical(document_texts(dataset))
        logger.info(
            "lexical residual (%s): IDF over %d training documents, mean length %.1f tokens at %d",
            model_args.lexical_analyzer,
            encoder.lexical.n_docs,
            encoder.lexical.avgdl(model_args.doc_max_length),
            model_args.doc_max_length,
        )
    if model_args.head_bias_df is not None and (
        encoder.head_bias is None or model_args.head_bias_recalibrate
    ):
        calibrate_on_training_docs(
            encoder,
            dataset,
            model_args.head_bias_df,
            n=model_args.head_bias_texts,
            queries=model_args.head_bias_queries,
        )
    idf = None
    if loss_args.doc_regularizer == "idf_flops" or model_args.doc_only:
        idf = encoder.document_idf(document_texts(dataset))
        if model_args.doc_only:
            encoder.query_weights = idf.clone()
    return idf


def calibrate_on_training_docs(
    encoder: SparseEncoder, dataset, doc_fraction: float, n: int = 512, queries: bool = True
):
    """Calibrate the encoder's head bias on up to `n` training documents, and with `queries` on up to
    `n` training queries too, both spread over the training data (every process the same).

    A model ZeRO-3 partitioned at load time is held whole for the pass (before the engine exists).
    """
    lexical_docs = encoder.config.lexical_docs  # its documents use no head: queries alone
    texts = [] if lexical_docs else calibration_documents(dataset, n)
    query_list = query_texts(dataset, n) if queries or lexical_docs else None
    with gathered(encoder):
        encoder.calibrate_head_bias(texts, doc_fraction=doc_fraction, queries=query_list)


def calibrate_on_texts(
    encoder: SparseEncoder,
    texts,
    doc_fraction: float,
    queries: bool,
    n: int = 512,
    show_progress: bool = True,
) -> None:
    """Calibrate the head bias on (up to `n` of) the adaptation texts; with `queries`, on a
    sentence of each of them as well, encoded as a query (:func:`query_length_spans`).

    A model ZeRO-3 partitioned at load time is held whole for the pass (before the engine exists).
    """
    docs = texts.select(range(min(n, len(texts))))["text"]
    spans = query_length_spans(docs) if queries else None
    with gathered(encoder):
        encoder.calibrate_head_bias(docs, doc_fraction, queries=spans, show_progress=show_progress)


def lexical_setup(encoder, texts, model_args, adapt_args, seed: int):
    """The lexical objective's inputs: a query-like sentence of each text (a ``query`` column, drawn
    once, seeded), the targets' IDF and lengths over the texts, and the head bias calibrated before
    training when the recipe asks for one (the objective then trains it: no calibration after)."""
    docs = texts["text"]
    texts = texts.add_column("query", query_length_spans(docs, seed=seed))
    weights = fit_statistics(encoder, docs, adapt_args.lexical_target_analyzer)
    logger.info(
        "lexical targets (%s): IDF over %d texts, mean length %.1f at %d tokens",
        adapt_args.lexical_target_analyzer,
        weights.n_docs,
        weights.avgdl(encoder.config.doc_max_length),
        encoder.config.doc_max_length,
    )
    if model_args.head_bias_df is not None and encoder.head_bias is None:
        calibrate_on_texts(encoder, texts, model_args.head_bias_df, model_args.head_bias_queries,
                           model_args.head_bias_texts)  # fmt: skip
    targets = LexicalTargets(
        encoder,
        weights,
        analyzer=adapt_args.lexical_target_analyzer,
        scale=adapt_args.lexical_target_scale,
    )
    return texts, targets


def adaptation_texts(adapt_args: AdaptationArguments):
    """The texts of `adapt_data` to adapt on (a table with a 'text' column), never none."""
    texts = read_texts(
        adapt_args.adapt_data,
        max_texts=adapt_args.max_adapt_texts,
        split=adapt_args.adapt_split,
        config=adapt_args.adapt_config,
    )
    if len(texts) == 0:
        raise ValueError(f"{adapt_args.adapt_data}: no texts to adapt on")
    return texts
