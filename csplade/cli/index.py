"""`csplade encode | search | export`: the search side of csplade from the command line.

    csplade encode --model M --corpus DATA/scifact --out runs/scifact/index
    csplade search --index runs/scifact/index --queries DATA/scifact/queries.jsonl --out run.trec
    csplade export --index runs/scifact/index --format anserini qdrant --out runs/scifact/export

`encode` writes resumable checksummed shards (`csplade.index.shards`): a rerun with the same model and
options encodes only the shards that are missing or corrupt; under `accelerate launch` each process
encodes its share of the shards (shard i -> rank i % world size) and rank 0 writes the final manifest.
The manifest records the encoder's `describe()` (settings + a fingerprint of its weights), the model it
was loaded from, the dtype, the pruning options and a fingerprint of the document texts; the batch size
is not recorded, so a resumed run may use another one (after an out-of-memory, say).

`search` and `export` reload that model by default. When it cannot be loaded here (the index was moved,
the model folder was deleted), `--model` is required, and in every case the loaded encoder must be the
one that built the index (:mod:`csplade.index.identity`): queries encoded by another model than the
documents would give a meaningless run, so this is an error, not a warning. `encode --lexical-stats
collection` estimates a lexical residual's statistics on the corpus and stores them with the index;
`search` and `export` read them back.

Queries (`--queries`): a BEIR `queries.jsonl` (or a BEIR folder), or any other file as TSV lines
`query-id<TAB>text` (MS MARCO style, no header).

Printing happens here; the library logs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from csplade._io import atomic_write
from csplade.cli.common import (
    add_model_loading,
    fraction,
    non_negative,
    non_negative_float,
    positive,
    positive_float,
)
from csplade.data.beir import doc_text, iter_corpus, load_queries
from csplade.index import (
    InvertedIndex,
    SeismicConfig,
    SeismicSearcher,
    encode_corpus,
    load_index,
    write_trec_run,
)
from csplade.index.export import (
    elasticsearch_query,
    export_index,
    opensearch_query,
    write_anserini_queries,
    write_qdrant_jsonl,
)
from csplade.model.config import LEXICAL_STATS

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- registration
# The argparse type of each numeric SeismicConfig knob (a KeyError here names a new, unchecked one).
SEISMIC_TYPES = {
    "n_postings": positive,
    "max_fraction": positive_float,
    "centroid_fraction": fraction,
    "min_cluster_size": positive,
    "summary_energy": fraction,
    "doc_cut": positive,
    "nknn": non_negative,
    "query_cut": positive,
    "heap_factor": positive_float,
    "n_knn": non_negative,
}


def register(sub: argparse._SubParsersAction) -> None:
    _register_encode(sub)
    _register_search(sub)
    _register_export(sub)


def _register_encode(sub) -> None:
    p = sub.add_parser(
        "encode",
        help="encode a corpus into resumable sparse shards (an index folder)",
        description="Encode documents into checksummed shards; a rerun resumes. Runs under "
        "`accelerate launch` (the shards are split between the processes).",
    )
    p.add_argument("--model", required=True, help="a csplade model folder or packaged name")
    p.add_argument("--corpus", required=True, help="a BEIR folder or a corpus.jsonl file")
    p.add_argument("--out", required=True, help="index folder (shards + manifest.json)")
    p.add_argument("--shard-size", type=positive, default=10_000, help="docs per shard")
    p.add_argument(
        "--quantize", choices=["fp16", "uint8"], default=None, help="storage (default float32)"
    )
    p.add_argument(
        "--scale",
        type=positive_float,
        default=None,
        help="uint8: one fixed scale (default: per shard)",
    )
    p.add_argument("--max-docs", type=positive, default=None, help="the first N docs only")
    p.add_argument(
        "--overwrite", action="store_true", help="discard shards written with other settings"
    )
    p.add_argument("--top-k", type=positive, default=None, help="keep the k largest weights")
    p.add_argument(
        "--threshold", type=non_negative_float, default=None, help="drop weights below this"
    )
    p.add_argument(
        "--lexical-stats",
        choices=LEXICAL_STATS,
        default="model",
        help="models with a lexical residual: IDF and document lengths saved with the model "
        "(model, the default) or estimated on this corpus (collection, as BM25 does), stored with "
        "the index and used by `search` and `export`",
    )
    add_model_loading(p, batch_what="docs")
    p.set_defaults(func=_encode)


def _register_search(sub) -> None:
    p = sub.add_parser(
        "search",
        help="encode queries and search an encoded index; write a TREC run",
        description="Search an index written by `csplade encode`: exact (numba or scipy kernel) "
        "or approximate (Seismic).",
    )
    p.add_argument("--index", required=True, help="index folder written by `csplade encode`")
    p.add_argument(
        "--queries", required=True, help="queries.jsonl (BEIR), a BEIR folder, or TSV qid<TAB>text"
    )
    p.add_argument("--out", required=True, help="TREC run file to write")
    p.add_argument(
        "--model", default=None, help="query encoder (default: the model recorded in the index)"
    )
    p.add_argument("--k", type=positive, default=1000, help="results per query (default 1000)")
    p.add_argument(
        "--backend",
        choices=["numba", "scipy", "seismic"],
        default=None,
        help="exact numba (default when installed) or scipy kernel, or approximate Seismic",
    )
    p.add_argument("--threads", type=positive, default=None, help="search threads")
    p.add_argument("--tag", default="csplade", help="run tag (last column of the run)")
    add_model_loading(p, batch_what="queries")
    group = p.add_argument_group("Seismic (--backend seismic; see csplade.index.seismic)")
    for f in dataclasses.fields(SeismicConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, dest=f"seismic_{f.name}"
            )
        else:
            group.add_argument(
                flag,
                type=SEISMIC_TYPES[f.name],
                default=None,
                dest=f"seismic_{f.name}",
                help=f"default {f.default}",
            )
    p.set_defaults(func=_search)


def _register_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export an encoded index (and queries) for Anserini, OpenSearch, Elasticsearch, Qdrant",
    )
    p.add_argument("--index", required=True, help="index folder written by `csplade encode`")
    p.add_argument(
        "--format",
        nargs="+",
        required=True,
        choices=["anserini", "opensearch", "elasticsearch", "qdrant"],
        help="one or more target formats",
    )
    p.add_argument("--out", required=True, help="output folder (one subfolder per format)")
    p.add_argument("--queries", default=None, help="also export these queries (jsonl/folder/TSV)")
    p.add_argument(
        "--model", default=None, help="encoder / tokenizer (default: the model recorded)"
    )
    p.add_argument("--field", default="splade", help="OpenSearch / Elasticsearch field name")
    add_model_loading(p, batch_what="queries")
    p.set_defaults(func=_export)


# ---------------------------------------------------------------------------------------- helpers


def read_queries(path: str | os.PathLike) -> dict[str, str]:
    """{query id: text} in file order from a BEIR queries.jsonl / BEIR folder, or a TSV file.

    TSV: one `query-id<TAB>text` per line, no header; blank lines are skipped. A line without a tab,
    with an empty id or an empty text, or a repeated id raises ValueError naming `file:line`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "queries.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"queries file not found: {path}")
    if path.suffix == ".jsonl":
        return load_queries(path)
    queries: dict[str, str] = {}
    lines: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            qid, tab, text = line.partition("\t")
            qid, text = qid.strip(), text.strip()
            if not tab or not qid or not text:
                raise ValueError(
                    f"{path}:{line_no}: expected 'query-id<TAB>text' (TSV; use a .jsonl name for "
                    f"BEIR JSON lines), got {line[:80]!r}"
                )
            if qid in queries:
                raise ValueError(
                    f"{path}:{line_no}: duplicate query id {qid!r} (first on line {lines[qid]})"
                )
            queries[qid] = text
            lines[qid] = line_no
    if not queries:
        raise ValueError(f"{path}: no queries")
    return queries


def _corpus_file(corpus: str) -> Path:
    path = Path(corpus)
    return path / "corpus.jsonl" if path.is_dir() else path


def _partial_state(device: str | None):
    """accelerate's process state: rank, world size, barrier and this process's device."""
    # Several processes on a machine without GPUs: join them over gloo (see CspladeTrainingArguments).
    from accelerate import PartialState

    from csplade.training.distributed import cpu_only_launch

    state = PartialState(cpu=cpu_only_launch())
    return state, device or str(state.device)


def _dir_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("shard-*.npz")) / 2**20


# ------------------------------------------------------------------------------------------ verbs


def _read_corpus(corpus: Path, max_docs: int | None) -> tuple[list[str], list[str]]:
    """(doc ids, texts) of a corpus file, its first `max_docs` when given."""
    doc_ids: list[str] = []
    texts: list[str] = []
    for doc_id, doc in iter_corpus(corpus):
        if max_docs is not None and len(doc_ids) >= max_docs:
            break
        doc_ids.append(doc_id)
        texts.append(doc_text(doc))
    if not doc_ids:
        raise ValueError(f"{corpus}: no documents")
    return doc_ids, texts


def _encode(args: argparse.Namespace) -> int:
    from csplade.index import identity
    from csplade.model.encoder import SparseEncoder

    if args.scale is not None and args.quantize != "uint8":
        raise ValueError("--scale needs --quantize uint8")
    doc_ids, texts = _read_corpus(_corpus_file(args.corpus), args.max_docs)
    state, device = _partial_state(args.device)
    rank, world = state.process_index, state.num_processes
    logger.info("rank %d of %d: encoding on %s", rank, world, device)
    encoder = SparseEncoder.from_pretrained(args.model, device=device, dtype=args.dtype)
    stats = identity.fit_to_collection(encoder, texts, args.lexical_stats)
    if stats == "collection" and state.is_main_process:
        identity.save_collection_statistics(encoder, args.out)
    record = identity.encoding_record(
        encoder, args.model, texts, args.top_k, args.threshold, lexical_stats=stats
    )
    encoded = [0]  # docs encoded by this process in this run (not reused from an earlier one)

    def encode_fn(batch: list[str]):
        encoded[0] += len(batch)
        return encoder.encode_docs(
            batch,
            batch_size=args.batch_size,
            show_progress=False,
            top_k=args.top_k,
            threshold=args.threshold,
        )

    start = time.perf_counter()
    manifest = encode_corpus(
        encode_fn, doc_ids, texts, args.out, describe=record, shard_size=args.shard_size,
        quantize=args.quantize, scale=args.scale, rank=rank, world_size=world,
        barrier=state.wait_for_everyone, overwrite=args.overwrite,
    )  # fmt: skip
    if manifest is not None:  # rank 0 reports
        _report_encoding(args, manifest, world, encoded[0], time.perf_counter() - start)
    return 0


def _report_encoding(args, manifest: dict, world: int, encoded: int, seconds: float) -> None:
    n_docs = manifest["settings"]["n_docs"]
    rate = f", {encoded / seconds:.1f} docs/s" if encoded else ""
    print(
        f"index: {args.out}\n"
        f"docs: {n_docs} in {manifest['n_shards']} shards, V={manifest['vocab_size']}\n"
        f"nnz/doc: {manifest['nnz'] / max(n_docs, 1):.1f}\n"
        f"size: {_dir_mb(Path(args.out)):.2f} MiB ({args.quantize or 'float32'})\n"
        f"processes: {world}\n"
        f"this run: rank 0 encoded {encoded} docs in {seconds:.1f}s{rate}"
        + (" (everything else was already encoded)" if encoded < n_docs else "")
    )


def _search(args: argparse.Namespace) -> int:
    from csplade.index.identity import encoder_for_index

    queries = read_queries(args.queries)
    seismic_knobs = {
        f.name: getattr(args, f"seismic_{f.name}")
        for f in dataclasses.fields(SeismicConfig)
        if getattr(args, f"seismic_{f.name}") is not None
    }
    if seismic_knobs and args.backend != "seismic":
        flags = ", ".join("--" + k.replace("_", "-") for k in seismic_knobs)
        raise ValueError(f"{flags} only apply to --backend seismic")
    encoder = encoder_for_index(args.index, args.model, args.device, args.dtype)
    docs, doc_ids, _ = load_index(args.index)
    query_ids = list(queries)
    start = time.perf_counter()
    q_reps = encoder.encode_queries(
        [queries[q] for q in query_ids], batch_size=args.batch_size, show_progress=True
    )
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    if args.backend == "seismic":
        config = SeismicConfig(**seismic_knobs)
        searcher = SeismicSearcher.build(docs, doc_ids, config=config, threads=args.threads)
    else:
        searcher = InvertedIndex.build(docs, doc_ids, backend=args.backend)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    k = min(args.k, max(1, len(doc_ids)))
    run = searcher.search_ids(q_reps, query_ids, k=k, threads=args.threads)
    search_s = time.perf_counter() - start
    write_trec_run(args.out, run, tag=args.tag)
    n_empty = sum(not hits for hits in run.values())
    print(
        f"run: {args.out} ({len(run)} queries, {sum(map(len, run.values()))} lines, k={k})\n"
        f"index: {len(doc_ids)} docs, backend {getattr(searcher, 'backend', 'seismic')}, built "
        f"in {build_s:.2f}s\n"
        f"queries: {q_reps.nnz / max(len(query_ids), 1):.1f} nnz/query, encoded in "
        f"{encode_s:.2f}s; searched in {search_s:.3f}s "
        f"({len(query_ids) / max(search_s, 1e-9):.0f} queries/s)"
        + (f"\nwarning: {n_empty} queries matched no document" if n_empty else "")
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from csplade.index.identity import encoder_for_index

    formats = list(dict.fromkeys(args.format))
    queries = read_queries(args.queries) if args.queries else None
    encoder = vocab = None
    if queries is not None or set(formats) - {"qdrant"}:  # qdrant docs need no token names
        encoder = encoder_for_index(args.index, args.model, args.device, args.dtype)
        vocab = encoder.vocabulary()
    written = export_index(args.index, args.out, vocab or [], formats=formats, field=args.field)
    if queries is not None:
        query_ids = list(queries)
        q_reps = encoder.encode_queries(
            [queries[q] for q in query_ids], batch_size=args.batch_size, show_progress=True
        )
        chunks = [(q_reps, query_ids)]
        out = Path(args.out)
        if "anserini" in formats:
            written["anserini_queries"] = out / "anserini" / "queries.tsv"
            write_anserini_queries(written["anserini_queries"], chunks, vocab)
        for flavour, body in (("opensearch", opensearch_query), ("elasticsearch", elasticsearch_query)):  # fmt: skip
            if flavour in formats:
                path = written[f"{flavour}_queries"] = out / flavour / "queries.jsonl"
                with atomic_write(path, "w") as handle:
                    for row, qid in enumerate(query_ids):
                        vec = q_reps[row]
                        query = body(vec.indices, vec.data, vocab, field=args.field)
                        handle.write(json.dumps({"query_id": qid, "body": query}) + "\n")
        if "qdrant" in formats:
            written["qdrant_queries"] = out / "qdrant" / "queries.jsonl"
            write_qdrant_jsonl(written["qdrant_queries"], chunks)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0
