"""A forget request: which training items must stop influencing a model.

Three kinds, combinable (the forget set is their union): ids listed in a file (an erasure request), whole
classes, and predicates on a record's fields (`label=cat,dog`, `user=alice`, `id!=keep/*`). Values may
use shell wildcards. A predicate names `label` (class name or index), `id`, or a field of the JSONL
manifest or Hugging Face dataset the source was read from; several predicates must all hold.
Retain = the training source minus the forget set.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cvfm.data.exclude import ids_sha256, read_ids
from cvfm.data.sources import HFSource, ImageSource, subset
from cvfm.data.text import ENCODING
from cvfm.errors import UsageError


@dataclass(frozen=True)
class Predicate:
    field: str
    values: tuple[str, ...]
    negate: bool = False

    @classmethod
    def parse(cls, text: str) -> Predicate:
        negate = "!=" in text
        field, sep, values = text.partition("!=" if negate else "=")
        field = field.strip()
        parts = tuple(v.strip() for v in values.split(",") if v.strip())
        if not sep or not field or not parts:
            raise UsageError(f"--forget-where '{text}' is not FIELD=VALUE[,VALUE...] or FIELD!=VALUE[,...]")
        return cls(field, parts, negate)

    def matches(self, *candidates) -> bool:
        """Whether the record holds: some candidate (a label's name and index) matches some value, or
        with `!=` none does."""
        hit = any(c is not None and fnmatch.fnmatchcase(str(c), v) for c in candidates for v in self.values)
        return hit != self.negate


@dataclass(frozen=True)
class ForgetRequest:
    ids_file: str | None = None  # text (one id per line) or .jsonl (an "id" per line); "-" = stdin
    classes: tuple[str, ...] = ()  # class names or indices
    where: tuple[str, ...] = ()  # predicates, all of which must hold
    request_id: str | None = None

    def __post_init__(self):
        if not (self.ids_file or self.classes or self.where):
            raise UsageError(
                "say what to forget: --forget FILE, --forget-class NAME or --forget-where FIELD=VALUE"
            )
        for text in self.where:
            Predicate.parse(text)  # fail early on a malformed predicate

    @property
    def predicates(self) -> list[Predicate]:
        return [Predicate.parse(t) for t in self.where]

    def forget_indices(self, source: ImageSource) -> np.ndarray:
        """Sorted indices of the forgotten items of `source`."""
        chosen = np.zeros(len(source), bool)
        if self.ids_file:
            wanted = set(read_ids(self.ids_file))
            present = {it.id for it in source.items}
            missing = sorted(wanted - present)
            if missing:
                raise UsageError(
                    f"{len(missing)} of {len(wanted)} ids in '{self.ids_file}' are not in the training data "
                    f"'{source.name}' (first: {', '.join(missing[:3])})"
                )
            chosen |= np.array([it.id in wanted for it in source.items])
        labels = _class_indices(source, self.classes)
        if labels:
            chosen |= np.isin(source.labels, sorted(labels))
        if self.where:
            chosen |= _where_mask(source, self.predicates)
        return np.flatnonzero(chosen)

    def split(self, source: ImageSource) -> tuple[ImageSource, ImageSource]:
        """(retain, forget) views of the training source; an empty side is a usage error."""
        forget = self.forget_indices(source)
        if len(forget) == 0:
            raise UsageError(f"the request matches no item of the training data '{source.name}'")
        if len(forget) == len(source):
            raise UsageError(
                f"the request matches all {len(source)} training items: nothing would be retained"
            )
        keep = np.setdiff1d(np.arange(len(source)), forget)
        return subset(source, keep), subset(source, forget)

    def forgotten_labels(self, source: ImageSource) -> set[int]:
        """Classes removed as a whole: named classes and `label=` predicates (when all predicates are on the
        label). Their test items measure forgetting, not generalisation."""
        labels = _class_indices(source, self.classes)
        preds = self.predicates
        if preds and all(p.field == "label" for p in preds):
            names = source.classes or []
            for c in range(max(len(names), int(source.labels.max()) + 1)):
                name = names[c] if c < len(names) else None
                if all(p.matches(name, c) for p in preds):
                    labels.add(c)
        return labels

    def split_test(
        self, test: ImageSource, train: ImageSource | None = None
    ) -> tuple[ImageSource, ImageSource | None]:
        """(test without the forgotten classes, test items of them); id requests leave the test set whole."""
        labels = self.forgotten_labels(train or test)
        if not labels:
            return test, None
        mask = np.isin(test.labels, sorted(labels))
        if mask.all():
            raise UsageError("the test split holds only forgotten classes: nothing left to measure TA on")
        gone = subset(test, np.flatnonzero(mask)) if mask.any() else None
        return subset(test, np.flatnonzero(~mask)), gone

    def describe(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v}


def default_request_id(ids) -> str:
    """A request id derived from the forgotten ids, so the same request twice has the same id."""
    return "req-" + ids_sha256(ids)[:16]


def _class_indices(source: ImageSource, classes) -> set[int]:
    names = source.classes or []
    out = set()
    for c in classes:
        if c in names:
            out.add(names.index(c))
        elif str(c).lstrip("-").isdigit() and 0 <= int(c) < max(len(names), int(source.labels.max()) + 1):
            out.add(int(c))
        else:
            known = ", ".join(names) if names else f"indices 0-{int(source.labels.max())}"
            raise UsageError(f"--forget-class '{c}' is not a class of '{source.name}' ({known})")
    return out


def _where_mask(source: ImageSource, preds: list[Predicate]) -> np.ndarray:
    fields = {p.field for p in preds} - {"label", "id"}
    records = _record_fields(source, fields) if fields else {}
    names = source.classes or []
    mask = np.ones(len(source), bool)
    for p in preds:
        if p.field == "label":
            hits = [
                p.matches(names[it.label] if 0 <= it.label < len(names) else None, it.label)
                for it in source.items
            ]
        elif p.field == "id":
            hits = [p.matches(it.id) for it in source.items]
        else:
            hits = [p.matches(records.get(it.id, {}).get(p.field)) for it in source.items]
        mask &= np.array(hits, bool)
    return mask


def _record_fields(source: ImageSource, fields: set[str]) -> dict[str, dict]:
    """id -> {field: value} for predicates on fields the source does not keep (JSONL, HF columns)."""
    if isinstance(source, HFSource):
        columns = set(source.dataset.column_names)
        unknown = sorted(fields - columns)
        if unknown:
            raise UsageError(f"--forget-where: '{source.name}' has no column {', '.join(unknown)}")
        return {it.id: {f: source.dataset[it.ref][f] for f in fields} for it in source.items}
    path = Path(source.name)
    if path.suffix != ".jsonl" or not path.is_file():
        raise UsageError(
            f"--forget-where on {', '.join(sorted(fields))}: '{source.name}' only has label and id "
            "(other fields come from a JSONL manifest or an hf: dataset)"
        )
    out, seen = {}, set()
    with open(path, encoding=ENCODING) as f:
        for lineno, line in enumerate(f, start=1):
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # the source already reported it as skipped
            if not isinstance(rec, dict):
                continue
            seen.update(rec)
            out[str(rec.get("id", f"{path.name}:{lineno}"))] = {k: rec.get(k) for k in fields}
    unknown = sorted(fields - seen)
    if unknown:
        raise UsageError(f"--forget-where: no record of '{source.name}' has the field {', '.join(unknown)}")
    return out
