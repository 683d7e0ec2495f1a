"""Whether an unlearning result may be called exact: the method, and the data it ran on.

`retrain` and `head` are exact only on the data the model was trained on, less the forgotten items.
Before either runs, the retained items are hashed as they are now and compared with the model's record
of its training items (data_items.jsonl beside run.json, `cvfm.data.digest`) less the forgotten ids.

- They match: "exact".
- They differ (an image changed, was relabelled, appeared or disappeared), or the record cannot be read:
  refused with a UsageError (exit 2) that names the first such items, because a retraining on other data
  is not the model retrained without the forget set. With `allow_changed_data` the method runs anyway
  and the guarantee is "empirical", the reason recorded in unlearn.json and the ledger.
- The model's run predates digests: "exact (data unverified)", and says so.

Approximate methods are "empirical" whatever the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cvfm.data.digest import Entry, compare, digest_items, without_ids
from cvfm.data.sources import DataError, ImageSource
from cvfm.errors import UsageError
from cvfm.runtime.run_dir import RunDir

EXACT_METHODS = ("retrain", "head")
UNVERIFIED = "exact (data unverified)"


@dataclass(frozen=True)
class Guarantee:
    level: str  # "exact" | "exact (data unverified)" | "empirical"
    basis: str  # why, in a sentence
    data_check: dict  # unlearn.json's record of the check: {"status": ..., ...}
    recorded: list[Entry] | None  # the model's training items less the forgotten ones (None: unknown)
    current: list[Entry] | None  # the retained items as they are now (exact methods only)

    @property
    def exact(self) -> bool:
        return self.level == "exact"

    def record(self) -> dict:
        return {"guarantee": self.level, "exact": self.exact, "guarantee_basis": self.basis}


def judge(
    method: str,
    model: str | Path,
    retain: ImageSource,
    forget_ids: list[str],
    *,
    allow_changed_data: bool = False,
) -> Guarantee:
    """The guarantee `method` can give on `model` with the retained data as it is now (see the module
    docstring); raises a UsageError for changed data unless `allow_changed_data`."""
    try:
        recorded = RunDir(model, resume=True).read_digest()
        problem = None
    except DataError as e:
        recorded, problem = None, f"its record of the training data cannot be read: {e}"
    recorded = None if recorded is None else without_ids(recorded, forget_ids)
    if method not in EXACT_METHODS:
        basis = f"method '{method}' is approximate: only the audit's measurements speak for it"
        return Guarantee("empirical", basis, {"status": "not checked"}, recorded, None)
    current = digest_items(retain)
    if recorded is None and problem is None:
        basis = (
            f"method '{method}' is exact, but '{model}' predates data digests (no data_items.jsonl), so "
            "nothing shows the retained data is what it was trained on"
        )
        return Guarantee(UNVERIFIED, basis, {"status": "unverified"}, None, current)
    changes = compare(recorded, current) if problem is None else None
    if problem is None and not changes:
        basis = (
            f"method '{method}' is exact: the {len(current)} retained items match, id by id and byte by "
            f"byte, the record of the items '{model}' was trained on, less the {len(forget_ids)} forgotten"
        )
        return Guarantee("exact", basis, {"status": "verified", "items": len(current)}, recorded, current)
    problem = problem or f"the training data changed since it was trained: {changes.describe()}"
    if not allow_changed_data:
        raise UsageError(
            f"'{model}': {problem}. `--method {method}` on this data would not be exact: restore the data, "
            "or pass --allow-changed-data to go on with an empirical guarantee"
        )
    check = {"status": "changed", "problem": problem, **(changes.as_dict() if changes else {})}
    basis = f"method '{method}' ran on other data than the model's ({problem}; --allow-changed-data)"
    return Guarantee("empirical", basis, check, recorded, current)
