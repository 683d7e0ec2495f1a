"""Image embeddings kept between runs (`--cache DIR`): a second run of prompts on the same images skips the
encoder. One safetensors file per (image content, encoder weights, preprocessing, precision), named by the
SHA-256 of them; a file is written atomically and read back only when its metadata agrees.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cvfm.models.segmenter import ImageEmbedding, Segmenter


class EmbeddingCache:
    """`get(content)` and `put(content, embedding)` for one segmenter (`content`: the image bytes)."""

    def __init__(self, folder: str | Path, segmenter: Segmenter, precision: str = "fp32"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model_key = _model_key(segmenter, precision)
        self.hits = self.misses = 0

    def _path(self, content: bytes) -> Path:
        key = hashlib.sha256(self.model_key.encode() + hashlib.sha256(content).digest()).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, content: bytes) -> ImageEmbedding | None:
        path = self._path(content)
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            tensors = load_file(str(path))
        except (OSError, SafetensorError):
            self.misses += 1
            return None
        if meta.get("model") != self.model_key:
            self.misses += 1
            return None
        self.hits += 1
        inter = [tensors[f"intermediate.{i}"] for i in range(int(meta.get("intermediate", 0)))]
        levels = int(meta.get("levels", 0))  # SAM 2: a list of feature levels
        features = [tensors[f"features.{i}"] for i in range(levels)] if levels else tensors["features"]
        return ImageEmbedding(
            features,
            [tuple(json.loads(meta["original_size"]))],
            [tuple(json.loads(meta["input_size"]))],
            inter or None,
        )

    def put(self, content: bytes, embedding: ImageEmbedding) -> None:
        """Keep the embedding of one image."""
        path = self._path(content)
        path.parent.mkdir(exist_ok=True)
        features = embedding.features
        if isinstance(features, list):
            tensors = {f"features.{i}": t.detach().cpu().contiguous() for i, t in enumerate(features)}
        else:
            tensors = {"features": features.detach().cpu().contiguous()}
        for i, t in enumerate(embedding.intermediate or []):
            tensors[f"intermediate.{i}"] = t.detach().cpu().contiguous()
        meta = {
            "model": self.model_key,
            "original_size": json.dumps(list(embedding.original_sizes[0])),
            "input_size": json.dumps(list(embedding.input_sizes[0])),
            "intermediate": str(len(embedding.intermediate or [])),
            "levels": str(len(features) if isinstance(features, list) else 0),
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)


def _model_key(segmenter: Segmenter, precision: str) -> str:
    """What an embedding depends on besides the image: the weights of the image encoder, the preprocessing
    and the precision it ran at (a hash, so a retrained model never reads a stale embedding)."""
    h = hashlib.sha256(json.dumps([asdict(segmenter.preprocess), precision], sort_keys=True).encode())
    for name, tensor in sorted(segmenter.model.vision_encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
