"""Search side of csplade: encoded corpus -> shards -> exact or approximate top-k -> runs / exports.

Modules (one concept each):
- `shards`    resumable corpus encoding into checksummed CSR shards; `load_index` / `iter_shards`.
- `inverted`  `InvertedIndex`: exact term-at-a-time top-k (numba or scipy kernel), save/load.
- `seismic`   `SeismicSearcher`: approximate top-k with pyseismic-lsr, same contract.
- `runs`      TREC run files (write/read) and top-k arrays -> run dicts.
- `export`    Anserini, OpenSearch / Elasticsearch and Qdrant exports.
- `bm25`      `bm25_search`: BM25 over raw texts (bm25s), the lexical baseline and negative miner.
- `storage`   reproducible .npz files, checksums, packed id lists (shared helpers).

Typical use:

    from csplade.index import InvertedIndex, encode_corpus, load_index, write_trec_run
    encode_corpus(encoder.encode_docs, doc_ids, texts, "runs/scifact/index", describe={...})
    docs, doc_ids, manifest = load_index("runs/scifact/index")
    index = InvertedIndex.build(docs, doc_ids)
    run = index.search_ids(q_reps, query_ids, k=1000)
    write_trec_run("runs/scifact/run.trec", run, tag="csplade")

`SeismicSearcher` imports pyseismic-lsr only when an index is built, so this package does not
require it.
"""

from csplade.index.bm25 import bm25_search
from csplade.index.inverted import InvertedIndex
from csplade.index.runs import read_trec_run, topk_to_run, write_trec_run
from csplade.index.seismic import SeismicConfig, SeismicSearcher
from csplade.index.shards import encode_corpus, iter_shards, load_index, read_manifest

__all__ = [
    "InvertedIndex",
    "SeismicConfig",
    "SeismicSearcher",
    "bm25_search",
    "encode_corpus",
    "iter_shards",
    "load_index",
    "read_manifest",
    "read_trec_run",
    "topk_to_run",
    "write_trec_run",
]
