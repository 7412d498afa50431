"""A tiny, randomly initialised BERT (and GPT-2) folder for fast, offline tests.

The tokenizer is character-level WordPiece over a fixed alphabet, so any ASCII text is
tokenised without a downloaded vocabulary.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    GPT2Config,
    GPT2Model,
    PreTrainedModel,
)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ALPHABET = string.ascii_lowercase + string.digits + string.punctuation


def _write_vocab(folder: Path) -> Path:
    vocab = SPECIAL + list(ALPHABET) + [f"##{c}" for c in ALPHABET]
    path = folder / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return path


def write_tiny_model(folder: Path | str, kind: str = "bert", seed: int = 0) -> Path:
    """Save a tiny ``kind`` ('bert' or 'gpt2') model and tokenizer into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_vocab(folder)
    tokenizer = BertTokenizer.from_pretrained(str(folder), do_lower_case=True)
    torch.manual_seed(seed)
    model: PreTrainedModel
    if kind == "bert":
        model = BertModel(
            BertConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                vocab_size=len(tokenizer),
                max_position_embeddings=256,
            )
        )
    elif kind == "gpt2":
        model = GPT2Model(
            GPT2Config(
                n_embd=32,
                n_layer=2,
                n_head=2,
                n_positions=256,
                bos_token_id=2,
                eos_token_id=3,
                vocab_size=len(tokenizer),
            )
        )
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
