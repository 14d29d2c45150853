"""Tiny random backbones and a tiny word-level tokenizer, built from configs (no hub access).

Every test that needs a model uses these: they are small enough to train for a few dozen steps on one
CPU core, and they cover each architecture on csplade's allow-list.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "[MASK]", "[CLS]", "[SEP]"]
CAUSAL_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def tiny_words(n: int = 249) -> list[str]:
    """Deterministic pseudo-words: 'aa', 'ab', … (two and three letters)."""
    letters = string.ascii_lowercase
    words = [a + b for a in letters for b in letters]
    words += [a + b + c for a in letters[:6] for b in letters for c in letters[:4]]
    return words[:n]


def tiny_tokenizer(n_words: int = 249, bert_style: bool = False) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `tiny_words`, vocab = specials + words."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tiny_words(n_words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert_style:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="<unk>",
            pad_token="<pad>",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="[MASK]",
    )


def tiny_config(arch: str, vocab_size: int = 256, **overrides):
    """A 2-layer config of `arch` (one of CAUSAL_ARCHS or 'bert')."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=True,
    )
    if arch == "bert":
        common.pop("bos_token_id")
        common.pop("eos_token_id")
        cfg = BertConfig(**{**common, **overrides})
    elif arch == "llama":
        cfg = LlamaConfig(**{**common, "num_key_value_heads": 2, **overrides})
    elif arch == "mistral":
        cfg = MistralConfig(
            **{**common, "num_key_value_heads": 2, "sliding_window": None, **overrides}
        )
    elif arch == "qwen2":
        cfg = Qwen2Config(**{**common, "num_key_value_heads": 2, **overrides})
    elif arch == "qwen3":
        cfg = Qwen3Config(**{**common, "num_key_value_heads": 2, "head_dim": 8, **overrides})
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(
            **{
                **common,
                "num_key_value_heads": 2,
                "head_dim": 8,
                "sliding_window": 4,
                "layer_types": ["sliding_attention", "full_attention"],
                **overrides,
            }
        )
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")
    return cfg


def tiny_model(arch: str = "llama", attn_implementation: str = "eager", seed: int = 0, **overrides):
    """A freshly initialised tiny model (CausalLM, or MaskedLM for 'bert') in eval mode."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    cls = AutoModelForMaskedLM if arch == "bert" else AutoModelForCausalLM
    model = cls.from_config(cfg, attn_implementation=attn_implementation)
    return model.eval()


def random_texts(n: int, min_words: int = 3, max_words: int = 12, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    words = tiny_words()
    out = []
    for _ in range(n):
        k = int(torch.randint(min_words, max_words + 1, (1,), generator=g))
        idx = torch.randint(0, len(words), (k,), generator=g).tolist()
        out.append(" ".join(words[i] for i in idx))
    return out
