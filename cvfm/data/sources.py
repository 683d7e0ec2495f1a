"""Image sources: one indexable face over a folder, a JSONL manifest, a Hugging Face dataset, a built-in set.

A source lists its items up front (cheap: paths, row numbers) and decodes one image on demand, so a
missing or corrupt file costs only that item. Problems found while listing (a malformed JSONL line)
are kept in `skipped` so a run summary can name them; with `strict=True` they raise instead.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from cvfm.data.builtin import open_builtin
from cvfm.data.items import UNLABELLED, ConcatSource, DataError, HFSource, ImageSource, Item
from cvfm.data.stream import arrived
from cvfm.data.text import ENCODING, own_stdin, stdin_lines
from cvfm.errors import UsageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
SPLITS_NOTE = "a split selects a sub-folder, a JSONL 'split' field, an HF split or a built-in split"


def open_source(
    spec: str,
    *,
    split: str | None = None,
    image_column: str = "image",
    label_column: str | None = None,
    text_column: str | None = None,
    images: bool = True,
    strict: bool = False,
) -> ImageSource:
    """Open a data spec: `builtin:<name>`, `hf:<name-or-path>`, a `.jsonl` manifest, an image folder, or
    `-` for standard input (one image path or one JSON record per line, paths relative to the cwd).

    `split` is optional: it selects a sub-folder, a JSONL 'split' field, an HF split or a
    built-in split. `text_column` adds each record's text (JSONL field or HF column); `images=False`
    reads text-only records. An empty result is a usage error.
    """
    _check_columns(images, text_column)
    if spec == "-":
        source = _Manifest.stdin(split, strict, text_column, images).read(stdin_lines())
    elif spec.startswith("builtin:"):
        source = open_builtin(spec.removeprefix("builtin:"), split=split, text_column=text_column)
    elif spec.startswith("hf:"):
        source = _open_hf(spec.removeprefix("hf:"), split, image_column, label_column, text_column, images)
    else:
        path = Path(spec)
        if not path.exists():
            raise UsageError(
                f"data source '{spec}' does not exist (expected a folder, a .jsonl file, "
                "builtin:<name> or hf:<dataset>)"
            )
        if path.is_dir():
            if text_column is not None:
                raise UsageError(
                    f"folder '{spec}' holds images only: texts come from a .jsonl manifest or hf: dataset"
                )
            source = _open_folder(path, split)
        elif path.suffix == ".jsonl":
            with open(path, encoding=ENCODING) as f:
                source = _Manifest(str(path), path.parent, split, strict, text_column, images).read(f)
        else:
            raise UsageError(f"data source '{spec}' is a file but not a .jsonl manifest")
    if len(source) == 0:
        raise _empty(spec, split, images)
    if not images:
        source.has_images = False
    return source


def follow_stdin(
    batch_size: int,
    *,
    split: str | None = None,
    text_column: str | None = None,
    images: bool = True,
    strict: bool = False,
) -> Iterator[ImageSource]:
    """Standard input, read as `open_source("-")` reads it, in sources of whole batches of `batch_size`
    items, each yielded as soon as its lines are there while the producer may still be writing: every
    whole batch that has arrived, then at the end the rest. Row i of the concatenated sources is row i of
    `open_source("-")`. An input without items is a usage error at its end."""
    _check_columns(images, text_column)
    manifest = _Manifest.stdin(split, strict, text_column, images)
    rows: list[tuple] = []
    found = False
    for lines in arrived(enumerate(own_stdin(), start=1), limit=64 * batch_size):
        rows += [r for n, line in lines if (r := manifest.row(n, line)) is not None]
        whole = len(rows) - len(rows) % batch_size
        if whole:
            yield manifest.source(rows[:whole])
            rows, found = rows[whole:], True
    if not rows and not found:
        manifest.check_found()
        raise _empty("-", split, images)
    yield manifest.source(rows)  # the last short batch, and the lines skipped since the previous


def _check_columns(images: bool, text_column: str | None) -> None:
    if not images and text_column is None:
        raise UsageError("a source without images needs a text column (--text-column)")


def _empty(spec: str, split: str | None, images: bool) -> UsageError:
    where = f" (split '{split}')" if split else ""
    return UsageError(f"data source '{spec}'{where} holds no {'images' if images else 'records'}")


def _open_folder(root: Path, split: str | None) -> ImageSource:
    if split is not None:
        if not (root / split).is_dir():
            raise UsageError(f"folder '{root}' has no '{split}' sub-folder ({SPLITS_NOTE})")
        root = root / split
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    class_dirs = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    index = {c: i for i, c in enumerate(class_dirs)}
    items = []
    for p in files:
        rel = p.relative_to(root)
        label = index[rel.parts[0]] if len(rel.parts) > 1 else UNLABELLED
        items.append(Item(id=rel.as_posix(), label=label, ref=str(p)))
    return ImageSource(name=str(root), items=items, classes=class_dirs or None)


class _Manifest:
    """Reads `{"id", "image", "label", "split"?, <text_column>?}` lines one at a time (with `bare_paths`,
    a line that is not a JSON object is an image path, and its id); image paths are relative to `base`.
    Malformed lines are kept in `skipped` (raised with `strict`)."""

    def __init__(self, name, base, split, strict, text_column, images, bare_paths=False):
        self.name, self.base, self.split, self.strict = name, base, split, strict
        self.text_column, self.images, self.bare_paths = text_column, images, bare_paths
        self.skipped: list[dict] = []
        self.class_names: set[str] = set()  # of every split, so train and test share one numbering
        self.first_fields: list[str] | None = None
        self._reported = 0

    @classmethod
    def stdin(cls, split, strict, text_column, images) -> _Manifest:
        """Standard input: paths relative to the working directory, bare paths allowed."""
        return cls("<stdin>", Path.cwd(), split, strict, text_column, images, bare_paths=True)

    def read(self, lines) -> ImageSource:
        """Every line as one source."""
        rows = [r for n, line in enumerate(lines, start=1) if (r := self.row(n, line)) is not None]
        if not rows:
            self.check_found()
        return self.source(rows)

    def row(self, lineno: int, line: str) -> tuple | None:
        """(id, label, ref, text) of one line; None for a blank, malformed or other split's line."""
        if not line.strip():
            return None
        if self.first_fields is None and line.lstrip().startswith("{"):
            self.first_fields = _fields(line)
        try:
            rec = _parse_record(line, self.images, self.text_column, self.bare_paths)
        except ValueError as e:
            problem = {"where": f"{self.name}:{lineno}", "reason": f"malformed JSONL line: {e}"}
            if self.strict:
                raise DataError(f"{problem['where']}: {problem['reason']}") from None
            self.skipped.append(problem)
            return None
        label = rec["label"]
        if isinstance(label, str):
            self.class_names.add(label)
        if self.split is not None and rec.get("split") != self.split:
            return None
        ref = None
        if self.images:
            image = Path(rec["image"])
            ref = str(image if image.is_absolute() else self.base / image)
        text = rec.get(self.text_column) if self.text_column else None
        return str(rec.get("id", f"{Path(self.name).name}:{lineno}")), label, ref, text

    def source(self, rows: list[tuple]) -> ImageSource:
        """`rows` as a source; string labels numbered by sorted class name; the lines skipped since the
        last call in `skipped`."""
        classes = sorted(self.class_names) or None  # sorted, like class sub-folders
        index = {c: i for i, c in enumerate(classes or [])}
        items = [
            Item(id=i, label=index[lab] if isinstance(lab, str) else lab, ref=ref, text=text)
            for i, lab, ref, text in rows
        ]
        skipped, self._reported = self.skipped[self._reported :], len(self.skipped)
        return ImageSource(self.name, items, classes=classes, skipped=skipped, has_images=self.images)

    def check_found(self) -> None:
        """Name what is wrong when no line gave a row (a missing text column, a split absent)."""
        column = self.text_column
        if column is not None and self.skipped and all(column in p["reason"] for p in self.skipped):
            fields = ", ".join(self.first_fields) if self.first_fields else "no fields"
            raise UsageError(
                f"manifest '{self.name}' has no text column '{column}' (its records have: {fields}); "
                "set --text-column"
            )
        if self.split is not None:
            raise UsageError(
                f'manifest \'{self.name}\' has no lines with "split": "{self.split}" ({SPLITS_NOTE})'
            )


def _fields(line: str) -> list[str]:
    """The keys of a JSON object line (for error messages); empty when it does not parse."""
    try:
        rec = json.loads(line)
    except ValueError:
        return []
    return list(rec) if isinstance(rec, dict) else []


def _parse_record(line: str, images: bool, text_column: str | None, bare_paths: bool) -> dict:
    """One manifest line as a checked dict; raises ValueError naming what is wrong."""
    stripped = line.strip()
    if bare_paths and not stripped.startswith("{"):  # `find . -name '*.jpg' | cvfm embed ... -`
        if text_column is not None or not images:
            raise ValueError(f'expected a JSON object with a "{text_column}" field')
        return {"id": stripped, "image": stripped, "label": UNLABELLED}
    rec = json.loads(stripped)
    if not isinstance(rec, dict):
        raise ValueError("expected a JSON object")
    if images and not isinstance(rec.get("image"), str):
        raise ValueError('expected a string "image" field')
    if text_column is not None:
        rec[text_column] = _check_text(rec.get(text_column), text_column)
    label = rec.get("label")
    label = UNLABELLED if label is None else label
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise ValueError('"label" must be an integer or a string')
    rec["label"] = label
    return rec


def _check_text(value, column: str) -> str | tuple[str, ...]:
    """A text cell: a string, or a non-empty list of strings (several captions of one image)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f'"{column}" must be a string or a list of strings, not {type(value).__name__}')


def _open_hf(
    name: str,
    split: str | None,
    image_column: str,
    label_column: str | None,
    text_column: str | None = None,
    images: bool = True,
) -> HFSource:
    import datasets

    try:
        local = Path(name)
        if (local / "dataset_dict.json").exists() or (local / "dataset_info.json").exists():
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
        raise UsageError(f"cannot open Hugging Face dataset '{name}': {_first_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("train" if "train" in ds else next(iter(ds)))
        if split not in ds:
            raise UsageError(f"dataset '{name}' has no split '{split}' (it has: {', '.join(ds)})")
        ds = ds[split]
    elif split is not None:  # a lone Dataset has no splits: never hand back all rows as 'test'
        raise UsageError(
            f"dataset '{name}' is a single Dataset without splits, so it has no split '{split}' "
            "(leave the split out)"
        )
    columns = list(ds.column_names)
    for kind, column in (("image", image_column if images else None), ("text", text_column)):
        if column is not None and column not in columns:
            raise UsageError(
                f"dataset '{name}' has no {kind} column '{column}' (columns: {', '.join(columns)})"
            )
    explicit = label_column is not None
    label_column = label_column or "label"
    if label_column not in columns:
        if explicit:
            raise UsageError(
                f"dataset '{name}' has no label column '{label_column}' (columns: {', '.join(columns)})"
            )
        labels, classes = [UNLABELLED] * len(ds), None
    else:
        feature = ds.features[label_column]
        classes = list(getattr(feature, "names", None) or []) or None
        values = ds[label_column]
        if values and all(isinstance(v, str) for v in values):  # string labels: sorted class names
            classes = sorted(set(values))
            labels = [classes.index(v) for v in values]
        else:
            labels = [UNLABELLED if v is None else int(v) for v in values]
    texts = [None] * len(ds)
    if text_column is not None:
        try:
            texts = [_check_text(v, text_column) for v in ds[text_column]]
        except ValueError as e:
            raise UsageError(f"dataset '{name}': {e}") from None
    items = [
        Item(id=f"{name}:{split or ''}:{i}", label=labels[i], ref=i, text=texts[i]) for i in range(len(ds))
    ]
    return HFSource(
        name=name, items=items, classes=classes, dataset=ds, image_column=image_column, has_images=images
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def subset(source: ImageSource, indices: Sequence[int]) -> ImageSource:
    """A view of `source` restricted to `indices` (same loader, same classes)."""
    view = copy.copy(source)
    view.items = [source.items[i] for i in indices]
    return view


def concat(sources: Sequence[ImageSource], name: str) -> ImageSource:
    """The items of `sources` one after another in one source (the first one's classes name the labels)."""
    items = [replace(it, ref=(k, j)) for k, s in enumerate(sources) for j, it in enumerate(s.items)]
    skipped = [entry for s in sources for entry in s.skipped]
    return ConcatSource(name, items, sources[0].classes, skipped, parts=list(sources))


def relabel(source: ImageSource, classes: list[str] | None, *, what: str) -> ImageSource:
    """A view of `source` with its labels renumbered to `classes` by class name (folders and manifests
    may number classes differently). Unchanged when either side has no names or they already agree."""
    if not source.classes or not classes or list(source.classes) == list(classes):
        return source
    index = {c: i for i, c in enumerate(classes)}
    present = {
        source.classes[label] for label in set(source.labels.tolist()) if 0 <= label < len(source.classes)
    }
    missing = sorted(present - set(index))
    if missing:
        raise UsageError(f"classes of '{source.name}' unknown to the {what}: {', '.join(missing[:5])}")
    view = copy.copy(source)
    view.items = [
        it if it.label == UNLABELLED else replace(it, label=index[source.classes[it.label]])
        for it in source.items
    ]
    view.classes = list(classes)
    return view
