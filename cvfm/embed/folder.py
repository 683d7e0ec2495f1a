"""The output folder: clip-retrieval layout, `embed.json`, parts written atomically, resume checks.

    embed.json                        the configuration (model, data, columns, part size, ...)
    img_emb/img_emb_{p}.npy           (n_p, D) image embeddings of part p
    text_emb/text_emb_{p}.npy         (n_p, D) text embeddings of part p (same rows)
    metadata/metadata_{p}.parquet     id, image, label, caption: row i describes row i of the arrays
                                      (label: the class name, or the integer; null when unknown)

Each file is written by rename, arrays first and the metadata last: a part counts as done only when its
metadata exists and carries the fingerprint of the current configuration (in the parquet schema
metadata, with the part's skipped items), so a run killed at any moment leaves whole parts or none, and
a part left from another configuration is never mistaken for a done one.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from cvfm.errors import UsageError
from cvfm.runtime.files import atomic_write, write_json
from cvfm.runtime.settings import check_same_settings, read_settings

CONFIG_FILE = "embed.json"
FORMAT = "cvfm-embed"
ARRAYS = {"image": ("img_emb", "img_emb_{}.npy"), "text": ("text_emb", "text_emb_{}.npy")}
METADATA = ("metadata", "metadata_{}.parquet")
LAYOUT = {CONFIG_FILE, "img_emb", "text_emb", "metadata"}
META_KEY = b"cvfm"
COLUMN_TYPES = {"id": "string", "image": "string", "label": "int64", "caption": "string"}
UNVERSIONED = ("cvfm_version",)  # recorded, but a resume with another cvfm release is allowed


def fingerprint(config: dict) -> str:
    """A short hash of the configuration (without the cvfm version)."""
    core = {k: v for k, v in config.items() if k not in UNVERSIONED}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # an atomic write in flight


class EmbedFolder:
    """An output folder for one configuration (`config`, with `modalities` among "image", "text")."""

    def __init__(self, path: str | Path, config: dict, modalities: tuple[str, ...]):
        self.path, self.config, self.modalities = Path(path), config, modalities
        self.fingerprint = fingerprint(config)

    # ------------------------------------------------------------------------------------- the folder

    def check(self, overwrite: bool) -> str:
        """Classify the folder as "new", "resume" (same configuration) or "overwrite"; raise UsageError
        for a folder that holds something else (another configuration, other files) unless `overwrite`."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise UsageError(f"output '{path}' is a file: embeddings go to a folder (or - for stdout)")
        if not path.exists() or self._is_empty():
            return "new"
        saved = read_settings(path / CONFIG_FILE, FORMAT)
        foreign = sorted(e.name for e in path.iterdir() if e.name not in LAYOUT and not _is_temp(e.name))
        if saved is not None and not foreign:
            if overwrite:
                return "overwrite"
            check_same_settings(
                saved,
                self.config,
                f"output folder '{path}' holds embeddings of another configuration",
                "rerun the same command to resume it, choose another folder, or pass --overwrite to "
                "replace it",
                ignore=UNVERSIONED,
            )
            return "resume"
        if overwrite:
            return "overwrite"
        what = f"other files ({', '.join(foreign[:3])})" if foreign else f"no readable {CONFIG_FILE}"
        raise UsageError(
            f"output folder '{path}' is not empty and is not a cvfm embed output ({what}): choose another "
            "folder, or pass --overwrite to write into it"
        )

    def _is_empty(self) -> bool:
        """Nothing but (empty) layout folders and temporary files of writes in flight."""
        for entry in self.path.iterdir():
            if _is_temp(entry.name):
                continue
            if entry.is_dir() and entry.name in LAYOUT and all(_is_temp(e.name) for e in entry.iterdir()):
                continue
            return False
        return True

    def write_config(self) -> None:
        write_json(self.path / CONFIG_FILE, {"format": FORMAT, **self.config})

    # ------------------------------------------------------------------------------------------ parts

    def file(self, kind: str, part: int) -> Path:
        folder, name = METADATA if kind == "metadata" else ARRAYS[kind]
        return self.path / folder / name.format(part)

    def part_info(self, part: int) -> dict | None:
        """The part's record ({"part", "config", "rows", "skipped"}) if it is done for this
        configuration, else None."""
        import pyarrow.parquet as pq

        meta = self.file("metadata", part)
        if not meta.exists() or not all(self.file(m, part).exists() for m in self.modalities):
            return None
        try:
            info = json.loads((pq.read_schema(meta).metadata or {}).get(META_KEY, b"null"))
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or info.get("config") != self.fingerprint:
            return None
        return info

    def write_part(
        self,
        part: int,
        arrays: dict[str, np.ndarray],
        columns: dict,
        skipped: list[dict],
        types: dict[str, str] | None = None,
    ) -> None:
        """Write part `part`: the arrays, then (last, as the completion mark) its metadata (columns typed
        by COLUMN_TYPES, or `types` where given)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        for kind in ARRAYS:
            if kind in arrays:
                atomic_write(self.file(kind, part), lambda p, a=arrays[kind]: _save_npy(p, a))
            else:  # left from an overwritten configuration that embedded this modality
                self.file(kind, part).unlink(missing_ok=True)
        rows = len(next(iter(columns.values())))
        info = {"part": part, "config": self.fingerprint, "rows": rows, "skipped": skipped}
        types = {k: pa.type_for_alias({**COLUMN_TYPES, **(types or {})}[k]) for k in columns}
        table = pa.table({k: pa.array(v, type=types[k]) for k, v in columns.items()})
        table = table.replace_schema_metadata({META_KEY: json.dumps(info).encode()})
        atomic_write(self.file("metadata", part), lambda p: pq.write_table(table, p))

    def remove_parts_from(self, num_parts: int) -> int:
        """Delete layout files of parts >= `num_parts` (left by a larger overwritten output)."""
        removed = 0
        for folder, name in (*ARRAYS.values(), METADATA):
            head, tail = name.split("{}")
            pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + "$")
            for f in (self.path / folder).glob("*") if (self.path / folder).is_dir() else ():
                m = pattern.match(f.name)
                if m and int(m.group(1)) >= num_parts:
                    f.unlink(missing_ok=True)
                    removed += 1
        return removed

    def dims(self, part: int) -> dict[str, int]:
        """Embedding sizes read from a done part's array headers (no model needed)."""
        return {m: int(np.load(self.file(m, part), mmap_mode="r").shape[1]) for m in self.modalities}


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
