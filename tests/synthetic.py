"""A synthetic retrieval task that a tiny model can only solve by learning: queries use other words.

Documents are 5 words drawn from a set A; a query is 2 of its document's words mapped through a fixed
bijection A -> B. There is no lexical overlap between a query and its document, so an untrained encoder
ranks at chance, and a trained one must learn the mapping (vocabulary expansion).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tiny import tiny_model, tiny_tokenizer, tiny_words

WORDS = tiny_words()
A, B = WORDS[:40], WORDS[40:80]
MAPPING = dict(zip(A, random.Random(0).sample(B, len(B)), strict=True))


def pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        doc = rng.sample(A, 5)
        query = [MAPPING[w] for w in rng.sample(doc, 2)]
        out.append((" ".join(query), " ".join(doc)))
    return out


def write_groups(path: Path, n: int = 400, negatives: int = 3, seed: int = 1) -> Path:
    train = pairs(n, seed)
    with path.open("w") as fh:
        for i, (query, doc) in enumerate(train):
            others = [j for j in random.Random(i).sample(range(n), negatives + 1) if j != i]
            negs = [train[j][1] for j in others[:negatives]]
            fh.write(json.dumps({"query": query, "positives": [doc], "negatives": negs}) + "\n")
    return path


def save_base(folder: Path, arch: str = "llama") -> Path:
    tiny_model(arch).save_pretrained(folder)
    tiny_tokenizer(bert_style=arch == "bert").save_pretrained(folder)
    return folder


def mrr_at_10(encoder, held: list[tuple[str, str]]) -> float:
    queries = encoder.encode_queries([q for q, _ in held], show_progress=False).toarray()
    docs = encoder.encode_docs([d for _, d in held], show_progress=False).toarray()
    scores = queries @ docs.T
    total = 0.0
    for i in range(len(held)):
        rank = int((scores[i] > scores[i, i]).sum()) + 1
        total += 1.0 / rank if rank <= 10 else 0.0
    return total / len(held)
