"""The unlearning audit: how much a classifier still knows of the forget set, and what it kept of the rest.

Metrics follow the unlearning papers' tables (Jia et al. 2023; Fan et al. 2024, SalUn), as fractions:
UA (unlearning accuracy, 1 - accuracy on the forget set), RA (retain accuracy), TA (test accuracy),
MIA-efficacy (`cvfm.unlearn.mia`), and the loss-threshold attack AUC. A retrained-from-scratch model is
the reference an approximate method is judged against: the gap to it per metric, and their average.
`evaluate_unlearning` is the library call behind `cvfm evaluate unlearning`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import cvfm
from cvfm.data.exclude import drop_ids, excluded_ids, ids_sha256
from cvfm.data.loader import SkipLog
from cvfm.data.sources import ImageSource, open_source, relabel, subset
from cvfm.errors import CvfmError, UsageError
from cvfm.runtime.device import default_device
from cvfm.unlearn.mia import (
    loss_threshold_auc,
    mia_efficacy,
    predictions,
    true_label_confidence,
)
from cvfm.unlearn.request import ForgetRequest

GAP_KEYS = ("ua", "ra", "ta", "mia_efficacy")  # the columns of SalUn's "average gap" (Fan et al. 2024)
UNLEARN_RECORD = "unlearn.json"


class Audit(dict):
    """The audit's metrics (a plain JSON-able dict) with the per-example attack scores kept aside in
    `.scores`: set name -> {"loss": (N,), "confidence": (N,)}, for plotting."""

    def __init__(self, metrics: dict, scores: dict[str, dict[str, np.ndarray]]):
        super().__init__(metrics)
        self.scores = scores


def audit(model: nn.Module, *, test: ImageSource, forget_test: ImageSource | None = None, **kwargs) -> Audit:
    """Audit `model` against one held-out `test` split (and, for class forgetting, `forget_test`); the
    other keyword arguments are `audit_splits`'."""
    return audit_splits(model, splits={"test": (test, forget_test)}, **kwargs)["test"]


def audit_splits(
    model: nn.Module,
    *,
    retain: ImageSource,
    forget: ImageSource,
    splits: dict[str, tuple[ImageSource, ImageSource | None]],
    transform,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    max_samples: int | None = None,
    skips: SkipLog | None = None,
) -> dict[str, Audit]:
    """Audit `model` (images -> logits) on labelled sources whose labels use the model's class numbering,
    against each held-out split of `splits`, name -> (test, forget_test): e.g. a validation split and the
    test split, with retain and forget predicted once.

    `forget_test` (class forgetting): the test items of the forgotten classes; `test` then holds the other
    classes only. `max_samples` scores a seeded random subset of retain of at most that size.

    Loss-threshold AUCs: `loss_auc` forget vs test (0.5: forget looks like unseen data), `loss_auc_retain`
    retain vs test (the model's general leakage) and, with `forget_test`, `loss_auc_forget_test` forget
    vs the forgotten classes' test items (0.5 after class forgetting; vs `test` the forgotten classes'
    high loss drives `loss_auc` towards 0 instead).
    """
    if max_samples is not None and max_samples < 1:
        raise UsageError(f"max_samples must be at least 1, got {max_samples}")
    retain_total = len(retain)
    if max_samples is not None and len(retain) > max_samples:
        pick = np.random.default_rng(seed).choice(len(retain), max_samples, replace=False)
        retain = subset(retain, np.sort(pick))
    sets = {"retain": retain, "forget": forget}
    for name, (test, forget_test) in splits.items():
        sets[f"{name}/test"] = test
        if forget_test is not None:
            sets[f"{name}/forget_test"] = forget_test
    skips = skips if skips is not None else SkipLog()
    out = {}
    for key, source in sets.items():
        probs, labels, losses = predictions(
            model,
            source,
            transform=transform,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            skips=skips,
            desc=f"{key} predictions",
        )
        if len(labels) == 0:
            raise CvfmError(f"the {key.split('/')[-1]} set has no readable image left to audit")
        out[key] = {
            "correct": probs.argmax(axis=1) == labels,
            "confidence": true_label_confidence(probs, labels),
            "loss": losses,
        }
    audits = {}
    for name in splits:
        scored = {"retain": out["retain"], "forget": out["forget"]}
        scored |= {k.split("/")[1]: v for k, v in out.items() if k.startswith(f"{name}/")}
        metrics = _metrics(scored, seed)
        if len(retain) < retain_total:
            metrics["counts"]["retain_total"] = retain_total
            metrics["max_samples"] = max_samples
        scores = {k: {"loss": o["loss"], "confidence": o["confidence"]} for k, o in scored.items()}
        audits[name] = Audit(metrics, scores)
    return audits


def _metrics(out: dict[str, dict[str, np.ndarray]], seed: int) -> dict:
    """The audit's metrics from each set's correctness, true-label confidence and loss."""
    metrics = {
        "ua": 1.0 - _mean(out["forget"]["correct"]),
        "ra": _mean(out["retain"]["correct"]),
        "ta": _mean(out["test"]["correct"]),
    }
    if "forget_test" in out:
        metrics["forget_test_accuracy"] = _mean(out["forget_test"]["correct"])
    metrics["mia_efficacy"] = mia_efficacy(
        out["retain"]["confidence"], out["test"]["confidence"], out["forget"]["confidence"], seed=seed
    )
    metrics["loss_auc"] = loss_threshold_auc(out["forget"]["loss"], out["test"]["loss"])
    metrics["loss_auc_retain"] = loss_threshold_auc(out["retain"]["loss"], out["test"]["loss"])
    if "forget_test" in out:  # class forgetting: the fair non-members of the forget set
        forget_test = out["forget_test"]["loss"]
        metrics["loss_auc_forget_test"] = loss_threshold_auc(out["forget"]["loss"], forget_test)
    metrics = {k: round(float(v), 6) for k, v in metrics.items()}
    metrics["counts"] = {name: int(len(o["loss"])) for name, o in out.items()}
    return metrics


def gaps(metrics: dict, reference: dict) -> dict:
    """|metrics - reference| in percentage points for UA, RA, TA and MIA-efficacy, and their mean
    `avg_gap` (the "Avg. Gap" of Fan et al. 2024's tables)."""
    missing = [k for k in GAP_KEYS if k not in metrics or k not in reference]
    if missing:
        raise ValueError(f"gaps need {', '.join(missing)} in both metric sets")
    diff = {k: abs(float(metrics[k]) - float(reference[k])) * 100.0 for k in GAP_KEYS}
    out = {k: round(v, 4) for k, v in diff.items()}
    out["avg_gap"] = round(sum(diff.values()) / len(diff), 4)
    return out


def evaluate_unlearning(
    model_id: str,
    *,
    data: str,
    request: ForgetRequest,
    split: str | None = "train",
    test_split: str | None = "test",
    original: str | None = None,
    reference: str | None = None,
    plot: str | None = None,
    batch_size: int = 256,
    num_workers: int = 2,
    seed: int = 0,
    max_samples: int | None = None,
    image_column: str = "image",
    label_column: str | None = None,
    strict: bool = False,
    device: str | None = None,
) -> dict:
    """Audit an unlearned classifier on `data`'s training split cut by `request` (retain / forget) and its
    test split, with its original ("before") and a retrained `reference` when known.

    The original defaults to the one named in the model's unlearn.json. Returns one JSON-able record
    `{"task": "unlearning", "model", "dataset", "guarantee", "metrics", "before", "reference", "gap", ...}`.
    """
    from cvfm.registry import create_classifier

    t0 = time.perf_counter()
    kw = {"image_column": image_column, "label_column": label_column, "strict": strict}
    train = open_source(data, split=split, **kw)
    test = open_source(data, split=test_split, **kw)
    for name, src in (("training", train), ("test", test)):
        if not src.has_labels:
            raise UsageError(f"the {name} data '{src.name}' has unlabelled images; the audit needs labels")
    test = relabel(test, train.classes, what="training data")
    train = _without_earlier_requests(train, model_id, request)
    retain, forget = request.split(train)
    test, forget_test = request.split_test(test, train)
    sets = {"retain": retain, "forget": forget, "test": test, "forget_test": forget_test}

    record_info, record_path = read_unlearn_record(model_id)
    if original is None and record_info is not None:
        original = _recorded_original(record_info, record_path)
    models = {"after": model_id, "before": original, "reference": reference}
    device = default_device(device)
    if device == "cpu":
        from cvfm.runtime.threads import share_cores_with_workers

        share_cores_with_workers(num_workers)
    skips = SkipLog(strict, train.skipped + test.skipped)
    audits: dict[str, Audit] = {}
    for key, mid in models.items():
        if mid is None:
            continue
        model = create_classifier(mid)
        model_sets = {
            k: relabel(v, _classes(model), what=f"model '{mid}'") for k, v in sets.items() if v is not None
        }
        audits[key] = audit(
            model,
            **model_sets,
            transform=model.preprocess.transform(),
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            seed=seed,
            max_samples=max_samples,
            skips=skips,
        )
        del model
    digest = ids_sha256(it.id for it in forget.items)
    guarantee, basis, matches = _guarantee(record_info, record_path, digest)
    if plot:
        from cvfm.unlearn.plot import plot_attack_scores

        plot_attack_scores(
            plot, after=audits["after"], before=audits.get("before"), reference=audits.get("reference")
        )
    record = {
        "task": "unlearning",
        "model": model_id,
        "dataset": data,
        "guarantee": guarantee,
        "guarantee_basis": basis,
        "method": record_info.get("method") if record_info else None,
        "metrics": dict(audits["after"]),
        "before": dict(audits["before"]) if "before" in audits else None,
        "reference": dict(audits["reference"]) if "reference" in audits else None,
        "gap": gaps(audits["after"], audits["reference"]) if "reference" in audits else None,
        "gap_before": (
            gaps(audits["before"], audits["reference"])
            if "before" in audits and "reference" in audits
            else None
        ),
        "original": original,
        "reference_model": reference,
        "forget": {
            "count": len(forget),
            "sha256": digest,
            "request": request.describe(),
            "matches_model": matches,
            "test_count": len(forget_test) if forget_test is not None else 0,
        },
        "data": {
            "split": split,
            "test_split": test_split,
            "train": len(train),
            "retain": len(retain),
            "test": len(test),
            "skipped": skips.as_list(),
        },
        "wall_s": {
            "unlearning": record_info.get("wall_s") if record_info else None,
            "audit": round(time.perf_counter() - t0, 3),
        },
        "plot": str(plot) if plot else None,
        "seed": seed,
        "cvfm_version": cvfm.__version__,
    }
    return record


def _without_earlier_requests(train: ImageSource, model_id: str, request: ForgetRequest) -> ImageSource:
    """The training data without what the model was already trained without (earlier requests of a
    chain, recorded in its run.json recipe), this request's ids excepted: they are the forget set."""
    run_json = Path(model_id) / "run.json"
    if not run_json.is_file():
        return train
    recipe = json.loads(run_json.read_text()).get("finetune") or {}
    earlier = excluded_ids(recipe.get("exclude"), recipe.get("ledger"))
    if not earlier:
        return train
    current = {train.items[i].id for i in request.forget_indices(train)}
    return drop_ids(train, earlier - current)[0]


def read_unlearn_record(model_id: str) -> tuple[dict | None, Path | None]:
    """The unlearn.json written beside an unlearned model (in its folder, or above its `classifier/`)."""
    path = Path(model_id)
    if not path.is_dir():
        return None, None
    for folder in (path, path.parent) if path.name == "classifier" else (path,):
        candidate = folder / UNLEARN_RECORD
        if candidate.is_file():
            try:
                info = json.loads(candidate.read_text(encoding="utf-8"))
            except ValueError as e:
                raise CvfmError(f"{candidate} is not valid JSON: {e}") from None
            if not isinstance(info, dict):
                raise CvfmError(f"{candidate} is not a JSON object")
            return info, candidate
    return None, None


def _classes(model: nn.Module) -> list[str] | None:
    classes = getattr(model, "classes", None)
    return list(classes) if classes else None


def _recorded_original(info: dict, path: Path) -> str | None:
    """The original model named in unlearn.json: as written, or relative to the record's folder."""
    original = info.get("original")
    if original is None:
        return None
    for candidate in (Path(original), path.parent / original):
        if candidate.exists():
            return str(candidate)
    raise UsageError(f"{path} names the original model '{original}', which is not there; pass --original")


def _guarantee(info: dict | None, path: Path | None, digest: str) -> tuple[str, str, bool | None]:
    """(the guarantee unlearn.json records, what it rests on, whether the model forgot this very set of
    ids); "empirical" when it forgot another set."""
    if info is None:
        return (
            "empirical",
            "no unlearn.json beside the model: nothing records how it was made, so only the audit's "
            "measurements speak for it",
            None,
        )
    recorded = info.get("forget_ids_sha256") or (info.get("forget") or {}).get("sha256")
    matches = None if recorded is None else recorded == digest
    method = info.get("method", "?")
    level = info.get("guarantee") or ("exact" if info.get("exact") else "empirical")
    basis = info.get("guarantee_basis")
    if level == "empirical":
        return "empirical", f"{path}: {basis or f'method {method!r} is approximate'}", matches
    if matches is False:
        return (
            "empirical",
            f"{path}: method '{method}' is exact, but for a different forget set than this request's",
            matches,
        )
    default = f"method '{method}' is exact (the model never trained on the forget set)"
    return level, f"{path}: {basis or default}", matches


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else float("nan")
