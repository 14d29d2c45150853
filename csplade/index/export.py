"""Export sparse vectors to other engines: Anserini (Lucene), OpenSearch / Elasticsearch, Qdrant.

Input everywhere is an iterable of (CSR (n, V), ids) chunks: `iter_shards(index_dir)` for an encoded
corpus (streamed shard by shard), or `[(matrix, ids)]` for anything in memory (e.g. encoded
queries). `export_index(index_dir, out_dir, vocab)` writes all document formats at once. Every
writer streams line by line into an atomic temp file (`os.replace` at the end): a crash leaves no
half-written file.

Token names. Anserini and OpenSearch key weights by token string; `vocab[i]` is the string of vocab
id i (e.g. `tokenizer.convert_ids_to_tokens(range(V))`). Characters the target cannot take in a
token are percent-encoded (`%` itself included, so the mapping stays one-to-one and the document
and query sides agree): whitespace for Anserini (its pre-tokenized analyzer splits on it), and `.`
for OpenSearch / Elasticsearch (their `rank_features` / `sparse_vector` fields reject dots in
feature names, which would otherwise read as object paths). Most tokens pass unchanged. An empty
token string, a missing vocab entry, or two used vocab ids with the same string raise ValueError.

Formats:
- Anserini JsonVectorCollection: JSONL `{"id", "contents", "vector": {token: int}}` with integer
  impacts round(w * 100) (numpy `rint`, half to even), the convention of Anserini's SPLADE
  regressions; tokens whose weight rounds to 0 are left out. Index with `IndexCollection
  -collection JsonVectorCollection -impact -pretokenized`. Queries go to a TSV file
  `qid<TAB>tokens`, each token repeated round(w * 100) times, which `SearchCollection -topicReader
  TsvString -impact -pretokenized` turns back into weighted term queries (Anserini's
  SPLADE++ regressions use this format).
- OpenSearch / Elasticsearch: bulk NDJSON (an `index` action line, then `{"id", field: {token:
  weight}}`), plus `mapping.json` declaring `field` as `rank_features` (OpenSearch) or
  `sparse_vector` (Elasticsearch >= 8.11). Both keep ~9 significant bits per weight and reject
  zero or negative weights: zeros are left out, a negative weight raises ValueError.
  `opensearch_query` / `elasticsearch_query` build the matching query bodies.
- Qdrant: JSONL `{"id", "indices", "values"}` with raw vocab ids, and `upsert_qdrant` /
  `search_qdrant` for a `qdrant_client.QdrantClient` (in-memory `":memory:"` works) with a named
  sparse vector. Qdrant point ids must be integers or UUIDs, so points are numbered in corpus order
  and the doc id travels in the payload (`{"doc_id": ...}`).

Weights in JSON are float32 values printed with the shortest decimal that reads back to the same
float32.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from csplade._io import atomic_write
from csplade.index.shards import iter_shards

logger = logging.getLogger(__name__)

Chunks = Iterable[tuple[sp.csr_matrix, Sequence[str]]]
ANSERINI_SCALE = 100


class TokenNames:
    """vocab id -> token name safe for one target, checked lazily for the ids actually used."""

    def __init__(self, vocab: Sequence[str], is_unsafe: Callable[[str], bool], target: str):
        self.vocab = vocab
        self.is_unsafe = is_unsafe
        self.target = target
        self._names: dict[int, str] = {}
        self._owner: dict[str, int] = {}

    def _escape(self, token: str) -> str:
        return "".join(
            "".join(f"%{b:02X}" for b in ch.encode("utf-8"))
            if ch == "%" or self.is_unsafe(ch)
            else ch
            for ch in token
        )

    def __getitem__(self, vocab_id: int) -> str:
        name = self._names.get(vocab_id)
        if name is not None:
            return name
        if not 0 <= vocab_id < len(self.vocab):
            raise ValueError(f"vocab id {vocab_id} has no entry in vocab (len {len(self.vocab)})")
        token = self.vocab[vocab_id]
        if not isinstance(token, str) or token == "":
            raise ValueError(
                f"vocab id {vocab_id}: token {token!r} cannot name a {self.target} term"
            )
        name = self._escape(token)
        other = self._owner.setdefault(name, vocab_id)
        if other != vocab_id:
            raise ValueError(
                f"vocab ids {other} and {vocab_id} are both {token!r}: their weights would merge "
                f"in {self.target}; pass a vocab with unique strings"
            )
        self._names[vocab_id] = name
        return name

    def json_keys(self, ids: np.ndarray) -> list[str]:
        return [json.dumps(self[int(i)], ensure_ascii=False) for i in ids]


def _anserini_names(vocab: Sequence[str]) -> TokenNames:
    return TokenNames(vocab, str.isspace, "Anserini")


def _engine_names(vocab: Sequence[str], flavour: str) -> TokenNames:
    return TokenNames(vocab, lambda ch: ch == ".", flavour)


def _float_strings(values: np.ndarray) -> list[str]:
    """Shortest decimal strings that read back to the same float32 values (valid JSON numbers)."""
    return values.astype(np.float32).astype(str).tolist()


def _rows(chunks: Chunks):
    """Yield (id, vocab ids (nnz,), weights (nnz,)) per row, validating every chunk."""
    for number, (matrix, ids) in enumerate(chunks):
        if not sp.issparse(matrix):
            raise TypeError(f"chunk {number}: expected a scipy.sparse matrix, got {type(matrix)}")
        csr = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
        csr.sum_duplicates()
        csr.eliminate_zeros()
        if csr.shape[0] != len(ids):
            raise ValueError(f"chunk {number}: {csr.shape[0]} rows but {len(ids)} ids")
        if csr.nnz and not np.isfinite(csr.data).all():
            raise ValueError(f"chunk {number}: non-finite weights")
        for row, ident in enumerate(ids):
            lo, hi = csr.indptr[row], csr.indptr[row + 1]
            yield ident, csr.indices[lo:hi], csr.data[lo:hi]


def _impacts(weights: np.ndarray, scale: float) -> np.ndarray:
    return np.rint(weights.astype(np.float64) * scale).astype(np.int64)


# ------------------------------------------------------------------------------------- Anserini


def write_anserini_collection(
    path: str | os.PathLike,
    chunks: Chunks,
    vocab: Sequence[str],
    contents: dict[str, str] | None = None,
    scale: float = ANSERINI_SCALE,
) -> int:
    """JsonVectorCollection JSONL; returns the number of docs written (see module docstring)."""
    names = _anserini_names(vocab)
    count = 0
    with atomic_write(path, "w") as handle:
        for ident, terms, weights in _rows(chunks):
            impacts = _impacts(weights, scale)
            if (impacts < 0).any():
                raise ValueError(f"doc {ident!r}: negative weight; Anserini impacts must be >= 0")
            keep = impacts > 0
            vector = ",".join(
                f"{key}:{value}"
                for key, value in zip(
                    names.json_keys(terms[keep]), impacts[keep].tolist(), strict=True
                )
            )
            text = json.dumps((contents or {}).get(ident, ""), ensure_ascii=False)
            handle.write(f'{{"id":{json.dumps(ident)},"contents":{text},"vector":{{{vector}}}}}\n')
            count += 1
    return count


def write_anserini_queries(
    path: str | os.PathLike, chunks: Chunks, vocab: Sequence[str], scale: float = ANSERINI_SCALE
) -> int:
    """TSV `qid<TAB>token token ...` with each token repeated round(w * scale) times."""
    names = _anserini_names(vocab)
    count = 0
    with atomic_write(path, "w") as handle:
        for ident, terms, weights in _rows(chunks):
            if "\t" in ident or "\n" in ident:
                raise ValueError(f"query id {ident!r} contains a tab or newline")
            impacts = _impacts(weights, scale)
            if (impacts < 0).any():
                raise ValueError(f"query {ident!r}: negative weight; impacts must be >= 0")
            tokens = " ".join(
                " ".join([names[int(t)]] * n)
                for t, n in zip(terms.tolist(), impacts.tolist(), strict=True)
                if n > 0
            )
            handle.write(f"{ident}\t{tokens}\n")
            count += 1
    return count


# ---------------------------------------------------------------------- OpenSearch / Elasticsearch

FLAVOURS = {"opensearch": "rank_features", "elasticsearch": "sparse_vector"}


def _field_type(flavour: str) -> str:
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {sorted(FLAVOURS)}, got {flavour!r}")
    return FLAVOURS[flavour]


def write_search_engine_mapping(
    path: str | os.PathLike, field: str = "splade", flavour: str = "opensearch"
) -> None:
    """`mapping.json`: the body of `PUT /<index>` declaring the id and the sparse field."""
    if "." in field:
        raise ValueError(f"field name {field!r} must not contain '.'")
    body = {
        "mappings": {
            "properties": {"id": {"type": "keyword"}, field: {"type": _field_type(flavour)}}
        }
    }
    with atomic_write(path, "w") as handle:
        json.dump(body, handle, indent=2)
        handle.write("\n")


def write_search_engine_bulk(
    path: str | os.PathLike,
    chunks: Chunks,
    vocab: Sequence[str],
    field: str = "splade",
    index_name: str | None = None,
    flavour: str = "opensearch",
) -> int:
    """Bulk NDJSON for `POST /_bulk` (or `/<index>/_bulk` when `index_name` is None)."""
    _field_type(flavour)
    names = _engine_names(vocab, flavour)
    count = 0
    with atomic_write(path, "w") as handle:
        for ident, terms, weights in _rows(chunks):
            action = {"_id": ident} if index_name is None else {"_index": index_name, "_id": ident}
            if (weights < 0).any():
                raise ValueError(f"doc {ident!r}: negative weight; {flavour} needs weights > 0")
            features = ",".join(
                f"{key}:{value}"
                for key, value in zip(names.json_keys(terms), _float_strings(weights), strict=True)
            )
            handle.write(json.dumps({"index": action}) + "\n")
            handle.write(f'{{"id":{json.dumps(ident)},{json.dumps(field)}:{{{features}}}}}\n')
            count += 1
    return count


def opensearch_query(terms, weights, vocab: Sequence[str], field: str = "splade", size: int = 10):
    """Search body scoring sum_t w_t * doc[field.t] with `rank_feature` linear clauses."""
    names = _engine_names(vocab, "opensearch")
    should = [
        {"rank_feature": {"field": f"{field}.{names[int(t)]}", "linear": {}, "boost": float(w)}}
        for t, w in zip(terms, weights, strict=True)
        if w > 0
    ]
    return {"size": size, "query": {"bool": {"should": should}}}


def elasticsearch_query(
    terms, weights, vocab: Sequence[str], field: str = "splade", size: int = 10
):
    """Search body for a `sparse_vector` field (Elasticsearch >= 8.15 `sparse_vector` query)."""
    names = _engine_names(vocab, "elasticsearch")
    vector = {names[int(t)]: float(w) for t, w in zip(terms, weights, strict=True) if w > 0}
    return {"size": size, "query": {"sparse_vector": {"field": field, "query_vector": vector}}}


# ---------------------------------------------------------------------------------------- Qdrant


def write_qdrant_jsonl(path: str | os.PathLike, chunks: Chunks) -> int:
    """JSONL `{"id": doc id, "indices": [vocab ids], "values": [weights]}`, one line per doc."""
    count = 0
    with atomic_write(path, "w") as handle:
        for ident, terms, weights in _rows(chunks):
            values = ",".join(_float_strings(weights))
            indices = ",".join(map(str, terms.tolist()))
            handle.write(
                f'{{"id":{json.dumps(ident)},"indices":[{indices}],"values":[{values}]}}\n'
            )
            count += 1
    return count


def _qdrant_models():
    try:
        from qdrant_client import models
    except ImportError as exc:
        raise ImportError("Qdrant export needs qdrant-client: pip install qdrant-client") from exc
    return models


def upsert_qdrant(
    client,
    collection: str,
    chunks: Chunks,
    vector_name: str = "sparse",
    batch_size: int = 256,
    create: bool = True,
) -> int:
    """Upsert docs as points with a named sparse vector; point id = corpus position.

    With `create=True` the collection is created (an existing one with that name is an error).
    Returns the number of points written.
    """
    models = _qdrant_models()
    if create:
        if client.collection_exists(collection):
            raise ValueError(f"Qdrant collection {collection!r} already exists")
        client.create_collection(
            collection,
            vectors_config={},
            sparse_vectors_config={vector_name: models.SparseVectorParams()},
        )
    points, count = [], 0
    for ident, terms, weights in _rows(chunks):
        vector = models.SparseVector(indices=terms.tolist(), values=weights.tolist())
        points.append(
            models.PointStruct(id=count, vector={vector_name: vector}, payload={"doc_id": ident})
        )
        count += 1
        if len(points) == batch_size:
            client.upsert(collection, points=points, wait=True)
            points = []
    if points:
        client.upsert(collection, points=points, wait=True)
    return count


def search_qdrant(
    client, collection: str, queries, k: int = 10, vector_name: str = "sparse"
) -> list[list[tuple[str, float]]]:
    """Top-k [(doc id, score), ...] per query row of a (n_q, V) sparse matrix."""
    models = _qdrant_models()
    csr = sp.csr_matrix(queries, dtype=np.float32)
    results = []
    for row in range(csr.shape[0]):
        lo, hi = csr.indptr[row], csr.indptr[row + 1]
        vector = models.SparseVector(
            indices=csr.indices[lo:hi].tolist(), values=csr.data[lo:hi].tolist()
        )
        hits = client.query_points(
            collection, query=vector, using=vector_name, limit=k, with_payload=True
        ).points
        results.append([(hit.payload["doc_id"], float(hit.score)) for hit in hits])
    return results


# -------------------------------------------------------------------------------- all at once


def export_index(
    index_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    vocab: Sequence[str],
    formats: Sequence[str] = ("anserini", "opensearch", "elasticsearch", "qdrant"),
    field: str = "splade",
) -> dict[str, Path]:
    """Write the chosen document exports of an encoded index (`encode_corpus` output).

    Files: anserini/docs.jsonl, opensearch/{bulk.ndjson,mapping.json},
    elasticsearch/{bulk.ndjson,mapping.json}, qdrant/docs.jsonl. Returns {name: path}.
    """
    out_dir = Path(out_dir)
    unknown = set(formats) - {"anserini", "opensearch", "elasticsearch", "qdrant"}
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}")
    written: dict[str, Path] = {}
    if "anserini" in formats:
        written["anserini"] = out_dir / "anserini" / "docs.jsonl"
        write_anserini_collection(written["anserini"], iter_shards(index_dir), vocab)
    for flavour in ("opensearch", "elasticsearch"):
        if flavour in formats:
            written[flavour] = out_dir / flavour / "bulk.ndjson"
            write_search_engine_bulk(
                written[flavour], iter_shards(index_dir), vocab, field=field, flavour=flavour
            )
            written[f"{flavour}_mapping"] = out_dir / flavour / "mapping.json"
            write_search_engine_mapping(written[f"{flavour}_mapping"], field, flavour)
    if "qdrant" in formats:
        written["qdrant"] = out_dir / "qdrant" / "docs.jsonl"
        write_qdrant_jsonl(written["qdrant"], iter_shards(index_dir))
    for name, path in written.items():
        logger.info("wrote %s export to %s", name, path)
    return written
