"""An `embed` output folder read as one pool of rows: the embeddings memory-mapped part by part (never
all in memory), the metadata (id, image, label, caption) as columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cvfm.embed.folder import CONFIG_FILE, FORMAT, EmbedFolder
from cvfm.errors import UsageError
from cvfm.runtime.settings import read_settings


class EmbeddingPool:
    """The rows of a complete embed folder, in part order. Indexing (`pool[a:b]`, `pool[indices]`) returns
    float32 rows scaled to unit length: curate compares embeddings by cosine similarity."""

    def __init__(self, path: str | Path, modality: str = "image"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        config = read_settings(self.path / CONFIG_FILE, FORMAT)
        if config is None:
            raise UsageError(f"'{path}' is not a cvfm embed output (no readable {CONFIG_FILE})")
        config.pop("format")
        if modality not in config["modalities"]:
            raise UsageError(f"embed output '{path}' has no {modality} embeddings ({config['modalities']})")
        self.config, self.modality = config, modality
        folder = EmbedFolder(self.path, config, tuple(config["modalities"]))
        missing = [p for p in range(config["num_parts"]) if folder.part_info(p) is None]
        if missing:
            raise UsageError(
                f"embed output '{path}' is incomplete ({len(missing)} of {config['num_parts']} parts "
                f"missing, first {missing[0]}): rerun its cvfm embed command to finish it"
            )
        parts = range(config["num_parts"])
        self._arrays = [np.load(folder.file(modality, p), mmap_mode="r") for p in parts]
        self._ends = np.cumsum([len(a) for a in self._arrays])
        self.metadata = pa.concat_tables(
            [pq.read_table(folder.file("metadata", p)) for p in parts], promote_options="permissive"
        )
        ids = self.metadata.column("id").to_pylist()
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise UsageError(f"embed output '{path}' has the id '{dup}' more than once: ids must be unique")
        self.ids = ids

    @property
    def dim(self) -> int:
        return int(self._arrays[0].shape[1]) if self._arrays else 0

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            key = np.arange(*key.indices(len(self)))
        rows = np.asarray(key, dtype=np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        part = np.searchsorted(self._ends, rows, side="right")
        for p in np.unique(part):
            at = np.flatnonzero(part == p)
            local = rows[at] - (self._ends[p - 1] if p else 0)
            out[at] = self._arrays[p][local]  # fancy indexing of a memmap reads those rows only
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def column(self, name: str) -> list:
        """A metadata column as a list (None where missing); a column the pool lacks is all None."""
        if name not in self.metadata.column_names:
            return [None] * len(self)
        return self.metadata.column(name).to_pylist()
