"""SparseEncoder: a language model turned into a SPLADE encoder.

    text ─tokenize→ (B, L) ─backbone→ hidden (B, L, H) ─LM head→ logits (B, L, V)
         ─log(1+ReLU)→ ─pool over L (max | sum, under a pooling mask)→ one (B, V) sparse vector per text

SPLADE v2 (arXiv 2109.10086) defines the activation and max pooling; CSPLADE (arXiv 2504.10816) applies it to
causal LLMs, whose token at position i sees only tokens ≤ i, and adds two remedies:

- ``bi``: the causal mask is swapped for a bidirectional one (:mod:`csplade.model.bidirectional`);
- ``echo``: the text is fed twice and only the second copy is pooled (:mod:`csplade.model.inputs`).

The head (:mod:`csplade.model.head`) is chunked over the vocabulary so the (B, L, V) logits are never
materialised (the memory wall at LLM scale: Llama-3's 128,256 terms); it also holds the quantized head,
the per-term bias calibration and the module call through which sharding engines gather the LM head.
`encode` turns texts into a scipy CSR matrix, batched longest first.

Inference-free models (``doc_only=True``, :mod:`csplade.model.inference_free`): the query side does no
forward pass.

Lexical documents (``lexical_residual`` with ``lexical_docs``): the mirror image. A document's vector is
its lexical residual alone (BM25 on its tokens, :mod:`csplade.model.lexical`) and no forward pass runs
for documents, in training or encoding; the queries carry the learned terms (their own tokens' weights
and expansion) on top of their IDF residual. The index is BM25 on the model's tokens, built without an
accelerator and over whole documents.

Known limits: the fused head needs a plain floating-point LM-head weight (a quantized head falls back to
calling the module: :mod:`csplade.model.head.splade`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from csplade._progress import progress
from csplade.model import frozen_docs, inference_free, inputs, windows
from csplade.model import io as model_io
from csplade.model import lexical as lexical_mod
from csplade.model.backbones import detect_kind
from csplade.model.bidirectional import make_bidirectional
from csplade.model.config import ADDED_SETTINGS, SparseEncoderConfig
from csplade.model.frozen_docs import DocVectors
from csplade.model.head import calibration
from csplade.model.head.pruning import keep_top_k, prune, to_csr
from csplade.model.head.sharded import HeadCall
from csplade.model.head.splade import bias_copy, splade_head
from csplade.model.head.weights import unwrap, vocab_size
from csplade.model.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)


_PLURAL = {"query": "queries", "doc": "docs"}


class _HeadReached(Exception):
    """Raised by a pre-hook to stop a generic MLM forward at its output embeddings."""


class SparseEncoder(nn.Module):
    """A SPLADE encoder over a Hugging Face causal-LM or masked-LM backbone."""

    # The loss is computed by the trainers (csplade.training), never inside forward: tells the HF
    # Trainer to scale it for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        config: SparseEncoderConfig,
        query_weights=None,
        head_bias=None,
        lexical: lexical_mod.LexicalWeights | None = None,
    ):
        super().__init__()
        kind = config.backbone_kind or detect_kind(unwrap(backbone).config)
        if config.pool_special_tokens is None:
            config = replace(config, pool_special_tokens=kind == "mlm")
        if config.pool_next_token is None:
            config = replace(config, pool_next_token=config.variant == "bi")
        config = replace(config, backbone_kind=kind)
        if kind == "mlm" and config.variant == "bi":
            raise ValueError(
                "variant 'bi' is for causal backbones; a masked-LM backbone is already bidirectional "
                "(use variant 'uni')"
            )
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer
        self._template = inputs.probe_template(tokenizer)
        first_unpredicted = not (self._template.head or config.query_prefix or config.doc_only)
        if config.pool_next_token and first_unpredicted:
            logger.warning(
                "variant %r pools the positions that predict the text and this tokenizer adds no "
                "BOS: without a query_prefix no position predicts a query's first token, so a "
                "one-token query encodes to a zero vector (set query_prefix, e.g. 'query: ')",
                config.variant,
            )
        self._pad_id = inputs.pick_pad_id(tokenizer)
        self.register_buffer("query_weights", self._per_term(query_weights, "query_weights"),
                             persistent=False)  # fmt: skip
        self.head_bias: nn.Parameter | None
        head_bias = self._per_term(head_bias, "head_bias")
        if head_bias is not None:
            self.head_bias = nn.Parameter(head_bias.clone())
        else:
            self.register_parameter("head_bias", None)
        self.lexical = lexical
        if lexical is not None and lexical.idf.numel() != self.vocab_size:
            raise ValueError(
                f"lexical weights have {lexical.idf.numel()} entries, the vocabulary {self.vocab_size}"
            )
        if config.variant == "bi":
            make_bidirectional(backbone)
        # Lower blocks' outputs per text when they are frozen (csplade.model.prefix_cache); None: off
        self.prefix_cache: PrefixCache | None = None
        # frozen_docs: each document's vector once computed (csplade.model.frozen_docs); None: off
        self.doc_vectors: DocVectors | None = None
        # The head runs as this module's call, so ZeRO-3 gathers its weight (csplade.model.head.sharded).
        self.head_call = HeadCall()
        self.head_calls: Counter[str] = Counter()  # head path -> calls: fused | naive | module
        self._fingerprint: str | None = None

    def _per_term(self, values: Any, name: str) -> torch.Tensor | None:
        """`values` as a float32 (V,) tensor, checked against the vocabulary (None stays None)."""
        if values is None:
            return None
        values = torch.as_tensor(values, dtype=torch.float32).flatten()
        if values.numel() != self.vocab_size:
            raise ValueError(
                f"{name} has {values.numel()} entries, the vocabulary {self.vocab_size}"
            )
        return values

    # ------------------------------------------------------------------ properties
    @property
    def base_model(self) -> nn.Module:
        """The transformers model (inside any peft wrapper)."""
        return unwrap(self.backbone)

    @property
    def vocab_size(self) -> int:
        return vocab_size(self.base_model)

    @property
    def _no_split_modules(self) -> list[str]:
        """The backbone's block classes (what FSDP's transformer-based auto-wrap shards by)."""
        return list(getattr(self.base_model, "_no_split_modules", None) or [])

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def is_adapter(self) -> bool:
        return hasattr(self.backbone, "peft_config")

    # ------------------------------------------------------------------ tokenization
    def _tokenize_plain(self, text: str) -> list[int]:
        return inputs.plain_ids(self.tokenizer, text)

    def tokenize(
        self, texts: Sequence[str], kind: str = "doc", windows: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Token ids, attention mask and pooling mask (all (B, L)) for `texts` as queries or docs.

        Also returns ``n_truncated`` (an int tensor): how many texts were cut at the max length; with
        ``lexical_residual`` on, ``lexical`` (B, L): each position's share of the text's lexical
        residual (:mod:`csplade.model.lexical`). `windows`: which window of each text a row holds
        (:func:`csplade.model.inputs.tokenize`).
        """
        lexical_on = self.config.lexical_residual
        if lexical_on and windows is not None:
            raise ValueError(
                "a text read in windows has no lexical residual (its tf is the text's)"
            )
        batch = inputs.tokenize(
            self.tokenizer, self._template, self._pad_id, self.config, texts, kind, lexical_on,
            windows,
        )  # fmt: skip
        if lexical_on:
            text_mask = batch.pop("text_mask")
            if self.lexical is not None:  # without them the forward fails (calibration needs none)
                ids = batch["input_ids"]
                if self.config.lexical_analyzer != "tokens":
                    limit = inputs.max_length(self.config, kind)
                    rows = [row[:limit] for row in self.lexical_rows(texts)]
                    ids, text_mask = inputs.pad_rows(rows, self._pad_id)
                    batch["lexical_ids"] = ids
                batch["lexical"] = lexical_mod.position_weights(
                    ids,
                    text_mask,
                    kind,
                    self.lexical,
                    self.config.lexical_scale,
                    self.config.doc_max_length,
                )
        return batch

    def lexical_rows(self, texts: Sequence[str]) -> list[list[int]]:
        """The token ids the lexical residual reads for each of `texts`, untruncated."""
        return lexical_mod.analyzed_rows(self.tokenizer, texts, self.config.lexical_analyzer)

    def fit_lexical(self, texts: Iterable[str], batch_size: int = 1024) -> None:
        """Estimate the lexical residual's IDF and document lengths on `texts`: the training documents,
        or a collection about to be indexed, as BM25 does on the collection it searches (the weights
        saved with the model are its training documents'). The fingerprint, hence an index's
        identity, changes."""
        if not self.config.lexical_residual:
            raise ValueError("fit_lexical: this encoder has no lexical residual (lexical_residual)")
        analyzer = self.config.lexical_analyzer
        rows = lexical_mod.token_rows(
            self.tokenizer, texts, analyzer, batch_size, desc="lexical statistics"
        )
        self.use_lexical(lexical_mod.statistics(rows, self.vocab_size))

    def use_lexical(self, weights: lexical_mod.LexicalWeights) -> None:
        """Use `weights` for the lexical residual (an index's collection statistics, say); the
        fingerprint follows."""
        if weights.idf.numel() != self.vocab_size:
            raise ValueError(
                f"lexical weights have {weights.idf.numel()} entries, the vocabulary {self.vocab_size}"
            )
        self.lexical = weights
        self._fingerprint = None

    def document_idf(self, texts: Iterable[str], batch_size: int = 1024) -> torch.Tensor:
        """BM25's IDF (V,) float32 of every token id over the documents `texts` (> 0 everywhere): the
        query weights of an inference-free model (arXiv 2411.04403) and what ``idf_flops`` divides by."""
        rows = lexical_mod.token_rows(
            self.tokenizer, texts, "tokens", batch_size, desc="document frequencies"
        )
        return lexical_mod.token_idf(rows, self.vocab_size)

    # ------------------------------------------------------------------ forward
    def _hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, nn.Module]:
        """Hidden states fed to the output embeddings (B, L, H), and that output module."""
        base = self.base_model
        out_emb = base.get_output_embeddings()
        if out_emb is None:
            raise ValueError(f"{type(base).__name__} has no output embeddings (LM head)")
        if self.config.backbone_kind == "causal":
            decoder = (
                base.base_model
            )  # e.g. LlamaModel: its last_hidden_state is after the final norm
            if self.prefix_cache is not None:
                hidden = self.prefix_cache.last_hidden_state(decoder, input_ids, attention_mask)
                return hidden, out_emb
            out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.last_hidden_state, out_emb
        predictions = getattr(getattr(base, "cls", None), "predictions", None)
        if predictions is not None and hasattr(predictions, "transform"):  # the BERT family
            out = base.base_model(input_ids=input_ids, attention_mask=attention_mask)
            return predictions.transform(out.last_hidden_state), out_emb
        # Any other masked LM: run it and catch the input of its output embeddings.
        captured: dict[str, torch.Tensor] = {}

        def grab(_module, args):
            captured["hidden"] = args[0]
            raise _HeadReached

        handle = out_emb.register_forward_pre_hook(grab)
        try:
            self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        except _HeadReached:
            pass
        finally:
            handle.remove()
        return captured["hidden"], out_emb

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pool_mask: torch.Tensor | None = None,
        lexical: torch.Tensor | None = None,
        lexical_ids: torch.Tensor | None = None,
        *,
        query: dict[str, torch.Tensor] | None = None,
        doc: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor | None, torch.Tensor | None]:
        """Activated, pooled vocabulary vectors (B, V), float32.

        Called with `query=` and/or `doc=` (batches from :meth:`tokenize`), it encodes both in one call and
        returns ``(q_reps, d_reps)``: one forward per step, as DDP expects. Doc-only models build query
        vectors from the stored token weights without running the backbone.
        """
        if query is not None or doc is not None:
            q_reps = d_reps = None
            if query is not None:
                if self.config.doc_only:
                    q_reps = self.query_token_weights(query["input_ids"], query["pool_mask"])
                else:
                    q_reps = self._encode_batch(**query)
            if doc is not None:
                if self.config.lexical_docs:  # no forward pass
                    d_reps = self._lexical_batch(**doc)
                elif self.config.frozen_docs:  # the model the adapter was put on, no gradient
                    d_reps = frozen_docs.encode(self, doc)
                else:
                    d_reps = self._encode_batch(**doc)
            return q_reps, d_reps
        if input_ids is None or attention_mask is None:
            raise ValueError("forward needs input_ids and attention_mask (or query=/doc= batches)")
        return self._encode_batch(input_ids, attention_mask, pool_mask, lexical, lexical_ids)

    def _encode_batch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pool_mask: torch.Tensor | None = None,
        lexical: torch.Tensor | None = None,
        lexical_ids: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        reps = self._learned_terms(input_ids, attention_mask, pool_mask)
        if self.config.learned_top_k is not None:
            reps = keep_top_k(reps, self.config.learned_top_k)
        if lexical is None:
            if self.config.lexical_residual:
                raise ValueError(
                    "lexical_residual is on but the batch has no 'lexical' weights: tokenize() adds "
                    "them once the encoder has lexical weights (csplade train computes them from its "
                    "training documents; or set encoder.lexical = csplade.model.lexical.statistics(...))"
                )
            return reps
        ids = input_ids if lexical_ids is None else lexical_ids
        return reps + lexical_mod.residual(ids.to(reps.device), lexical, reps.shape[1])

    def _lexical_batch(
        self,
        input_ids: torch.Tensor,
        lexical: torch.Tensor | None = None,
        lexical_ids: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        """(B, V) float32: a tokenized batch's lexical residual alone (``lexical_docs`` documents)."""
        if lexical is None:
            raise ValueError(
                "lexical_docs: the batch has no 'lexical' weights: tokenize() adds them once the "
                "encoder has lexical weights (csplade train computes them from its training documents)"
            )
        device = self.device
        ids = input_ids if lexical_ids is None else lexical_ids
        return lexical_mod.residual(ids.to(device), lexical.to(device), self.vocab_size)

    def pooled_logits(self, input_ids, attention_mask, pool_mask=None, **_: Any) -> torch.Tensor:
        """(B, V) float32: the max-pooled logits the learned terms activate (head bias, scale and
        softcap in; max pooling, a plain LM head): an objective's way to terms that are off."""
        if self.config.pooling != "max":
            raise ValueError(f"pooled_logits needs max pooling, not {self.config.pooling!r}")
        return self._learned_terms(input_ids, attention_mask, pool_mask, raw=True)

    def _learned_terms(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pool_mask: torch.Tensor | None,
        raw: bool = False,
    ) -> torch.Tensor:
        """The head's activated, pooled logits (B, V) float32 (without any lexical residual); with
        `raw`, the max-pooled logits before the activation (:meth:`pooled_logits`)."""
        if pool_mask is None:
            pool_mask = attention_mask.bool()
        hidden, out_emb = self._hidden_states(input_ids, attention_mask)  # (B, L, H)
        pool_mask = pool_mask.to(hidden.device) & attention_mask.bool().to(hidden.device)
        return splade_head(
            hidden,
            pool_mask,
            out_emb,
            self.base_model,
            head_bias=self.head_bias,
            config=self.config,
            head_call=self.head_call,
            calls=self.head_calls,
            raw=raw,
        )

    def head_bias_tensor(self) -> torch.Tensor | None:
        """A float32 copy (V,) of the head bias (gradient flows to it), or None: for the adaptation
        loss, which reads the bias outside this forward (:func:`csplade.model.head.splade.bias_copy`)."""
        return bias_copy(self.head_bias, self.head_call)

    # ------------------------------------------------------------------ head bias
    def raw_max_logits(
        self, texts: Sequence[str], kind: str = "doc", batch_size: int = 16
    ) -> torch.Tensor:
        """See :func:`csplade.model.head.calibration.raw_max_logits`."""
        return calibration.raw_max_logits(self, texts, kind=kind, batch_size=batch_size)

    def calibrate_head_bias(
        self,
        texts: Sequence[str],
        doc_fraction: float = 0.01,
        batch_size: int = 16,
        queries: Sequence[str] | None = None,
        show_progress: bool = True,
    ) -> torch.Tensor:
        """See :func:`csplade.model.head.calibration.calibrate_head_bias`."""
        return calibration.calibrate_head_bias(
            self, texts, doc_fraction, batch_size, queries, show_progress
        )

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, **kwargs: Any
    ) -> None:
        """Recompute the backbone's layer activations in backward (HF Trainer's hook)."""
        gc_kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        self.base_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=gc_kwargs, **kwargs
        )

    # ------------------------------------------------------------------ encoding
    def encode(
        self,
        texts: Sequence[str],
        kind: str = "doc",
        batch_size: int = 32,
        show_progress: bool = True,
        top_k: int | None = None,
        threshold: float | None = None,
    ) -> sp.csr_matrix:
        """Encode texts into a float32 CSR matrix (n, V), rows in input order.

        Texts are batched longest first (less padding; an out-of-memory shows up in the first batch).
        `top_k` keeps the k largest weights per row; `threshold` zeroes weights below it. With
        ``doc_windows`` > 1 a document longer than ``doc_max_length`` tokens is read in up to that
        many windows, pooled into one vector before `top_k` and `threshold`.
        """
        texts = inputs.check_texts(texts)
        vocab = self.vocab_size
        if not texts:
            return sp.csr_matrix((0, vocab), dtype=np.float32)
        if kind == "query" and self.config.doc_only:
            return self._encode_doc_only_queries(texts, top_k, threshold)

        lengths = [len(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        was_training = self.training
        self.eval()
        bar = progress(
            total=len(texts), unit=kind, desc=f"encode {_PLURAL[kind]}", disable=not show_progress
        )
        try:
            with torch.inference_mode():
                blocks, n_truncated = self._encode_in_order(
                    texts, order, kind, batch_size, bar, top_k, threshold
                )
        finally:
            bar.close()
            self.train(was_training)
        if n_truncated:
            read = self.config.doc_windows if kind == "doc" else 1  # windows read per text
            logger.info(
                "%d of %d %s were longer than %d tokens and truncated",
                n_truncated,
                len(texts),
                _PLURAL[kind],
                inputs.max_length(self.config, kind) * read,
            )
        stacked = sp.vstack(blocks, format="csr")
        inverse = np.empty(len(order), dtype=np.int64)
        inverse[np.asarray(order)] = np.arange(len(order))
        out = stacked[inverse]
        out.sort_indices()
        return out.astype(np.float32)

    def _encode_in_order(self, texts, order, kind, batch_size, bar, top_k, threshold):
        """CSR blocks of `texts` taken in `order`, `batch_size` at a time, and how many were cut."""
        blocks: list[sp.csr_matrix] = []
        n_truncated = 0
        device = self.device
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if kind == "doc" and self.config.doc_windows > 1:
                reps, cut = windows.encode([texts[i] for i in idx], self, batch_size)
                n_truncated += cut
            else:
                batch = self.tokenize([texts[i] for i in idx], kind=kind)
                n_truncated += int(batch.pop("n_truncated"))
                batch = {k: v.to(device) for k, v in batch.items()}
                q_reps, d_reps = self(**{kind: batch})  # (b, V) float32, one of them
                reps = q_reps if kind == "query" else d_reps
            blocks.append(to_csr(prune(reps, top_k, threshold)))
            bar.update(len(idx))
        return blocks, n_truncated

    def encode_queries(self, texts: Sequence[str], **kwargs: Any) -> sp.csr_matrix:
        return self.encode(texts, kind="query", **kwargs)

    def encode_docs(self, texts: Sequence[str], **kwargs: Any) -> sp.csr_matrix:
        return self.encode(texts, kind="doc", **kwargs)

    def query_token_weights(
        self, input_ids: torch.Tensor, token_mask: torch.Tensor
    ) -> torch.Tensor:
        """Doc-only query vectors (B, V): :func:`csplade.model.inference_free.query_vectors`."""
        return inference_free.query_vectors(
            input_ids, token_mask, self.query_weights, self.vocab_size
        )

    def _encode_doc_only_queries(self, texts, top_k, threshold) -> sp.csr_matrix:
        out = inference_free.encode_queries(
            self.tokenizer, texts, self.query_weights, self.vocab_size, self.config.query_max_length
        )
        if top_k is not None or threshold is not None:
            dense = torch.from_numpy(out.toarray())
            out = to_csr(prune(dense, top_k, threshold))
        out.sort_indices()
        return out

    # ------------------------------------------------------------------ inspection
    def vocabulary(self) -> list[str]:
        """Token strings indexed by vocabulary id (ids beyond the tokenizer map to '[id]')."""
        vocab = self.vocab_size
        tokens = self.tokenizer.convert_ids_to_tokens(list(range(min(vocab, len(self.tokenizer)))))
        tokens = [t if t is not None else f"[{i}]" for i, t in enumerate(tokens)]
        return tokens + [f"[{i}]" for i in range(len(tokens), vocab)]

    def to_tokens(self, row: Any, top: int | None = None) -> dict[str, float]:
        """``{token: weight}`` of one vector (a CSR row, a 1-D array or tensor), largest first."""
        if sp.issparse(row):
            row = row.tocsr()
            if row.shape[0] != 1:
                raise ValueError(f"to_tokens takes one row, got shape {row.shape}")
            ids, vals = row.indices, row.data
        else:
            dense = row.detach().cpu().numpy() if torch.is_tensor(row) else np.asarray(row)
            dense = dense.reshape(-1)
            ids = np.flatnonzero(dense)
            vals = dense[ids]
        order = np.argsort(-vals, kind="stable")
        if top is not None:
            order = order[:top]
        tokens = self.tokenizer.convert_ids_to_tokens([int(ids[i]) for i in order])
        return {str(tok): float(vals[i]) for tok, i in zip(tokens, order, strict=True)}

    def describe(self) -> dict[str, Any]:
        """Identity of this encoder for index manifests: settings plus a fingerprint of its weights."""
        info = asdict(self.config)
        info.pop("extra", None)
        for name, value in ADDED_SETTINGS.items():
            if info.get(name) == value:
                del info[name]
        info["vocab_size"] = self.vocab_size
        info["fingerprint"] = self.fingerprint()
        return info

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_io.fingerprint(self)
        return self._fingerprint

    # ------------------------------------------------------------------ persistence
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        atomic: bool = True,
    ) -> None:
        """Write the encoder into one folder; see :func:`csplade.model.io.save`."""
        model_io.save(self, save_directory, state_dict=state_dict, atomic=atomic)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload the encoder (saved as by `save_pretrained`, with its card) to the hub."""
        return model_io.push_to_hub(self, repo_id, private=private, token=token)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        quantization: str = "none",
        quantize_head: bool = False,
        **kwargs: Any,
    ) -> SparseEncoder:
        """Load a saved csplade encoder, or build a fresh one over a backbone (name or folder).

        Keyword arguments: `dtype`, `attn_implementation`, `device`, `trust_remote_code`,
        `backbone_kwargs`, and :class:`SparseEncoderConfig` fields (variant, pooling, max lengths,
        prefixes, …) as overrides. `quantization` (none | bf16 | fp16 | int8 | nf4 | fp4 |
        torchao-int8-wo | torchao-int8-dyn | gptq) and `quantize_head`: see
        :mod:`csplade.quantization.modes`. See :func:`csplade.model.io.load`.
        """
        return model_io.load(
            cls, name_or_path, quantization_mode=quantization, quantize_head=quantize_head, **kwargs
        )
