"""`cvfm unlearn` as a library call: carry out one forget request on a classifier, audit it, record it.

The model is a classifier from `cvfm finetune` (or the output of an earlier `unlearn`): its run.json
holds the recipe it was trained with, so `retrain` can rerun that recipe on the retained data (exact),
`head` can refit a frozen backbone's head (exact), and the approximate methods know the training data,
batch size, augmentation and length. Exact holds only if the data is still the data the model was
trained on: `cvfm.unlearn.guarantee` checks the items against the model's record first.

The output folder is itself a classifier run: `classifier/`, `run.json` (the recipe, now excluding
every forgotten id, so a later request can retrain exactly), `data_items.jsonl` (the items it stands
for), `forgotten_ids.txt`, `unlearn.json` (request, method, guarantee and its basis, the data check,
settings, wall time, audit) and the attack-score plot. With a ledger, the request is appended to it,
and a request already in it is not carried out again.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate import PartialState

import cvfm
from cvfm.data.exclude import excluded_ids, ids_sha256
from cvfm.data.sources import ImageSource, open_source, relabel
from cvfm.errors import UsageError
from cvfm.finetune import FinetuneConfig, finetune, fit_frozen_classifier, open_training_data
from cvfm.finetune import recipe as finetune_recipe
from cvfm.methods.supervised import train_transform
from cvfm.models.classifier import Classifier, KnnHead
from cvfm.registry import create_classifier
from cvfm.runtime.accelerator import cpu_processes
from cvfm.runtime.device import default_device
from cvfm.runtime.files import save_atomically, write_json, write_text
from cvfm.runtime.progress import log
from cvfm.runtime.run_dir import RunDir
from cvfm.runtime.threads import share_cores_with_workers
from cvfm.unlearn.guarantee import EXACT_METHODS, Guarantee, judge
from cvfm.unlearn.ledger import Ledger, model_digest
from cvfm.unlearn.request import ForgetRequest, default_request_id

AUDIT_KEYS = (
    "ua",
    "ra",
    "ta",
    "mia_efficacy",
    "loss_auc",
    "loss_auc_retain",
    "forget_test_accuracy",
    "loss_auc_forget_test",
    "counts",
)


@dataclass
class UnlearnConfig:
    model: str  # a `cvfm finetune` run folder, or an earlier `cvfm unlearn` output
    output: str
    request: ForgetRequest
    method: str | None = (
        None  # None: the exact method that applies ("head" for frozen backbones, else "retrain")
    )
    options: dict = field(default_factory=dict)  # method options (--opt key=value)
    epochs: int | None = None  # approximate methods; None: scaled from the original training length
    test_split: str | None = "test"
    seed: int = 0
    num_workers: int = 2
    ledger: str | None = None
    audit: bool = True
    overwrite: bool = False
    resume: bool = False  # retrain: continue an interrupted retraining in `output`
    allow_changed_data: bool = False  # exact methods on data that changed since training: "empirical"


def training_recipe(model: str) -> FinetuneConfig:
    """The recipe `model` was trained with (its run.json), as a FinetuneConfig."""
    folder = Path(model)
    run_json = folder / "run.json"
    if not run_json.is_file():
        raise UsageError(
            f"'{model}' has no run.json: unlearning needs a classifier trained by `cvfm finetune` "
            "(or the output of an earlier `cvfm unlearn`), whose recipe names its training data"
        )
    record = json.loads(run_json.read_text())
    if "finetune" not in record:
        raise UsageError(f"'{model}' is not a `cvfm finetune` run (its run.json has no fine-tuning recipe)")
    return FinetuneConfig(**record["finetune"])


def unlearn(cfg: UnlearnConfig) -> dict:
    """Carry out `cfg.request` on `cfg.model`; returns the ledger-shaped record (also in unlearn.json).

    Under `accelerate launch`, `retrain` trains on every process; everything else runs on the main
    process, and the other processes return an empty record."""
    state = PartialState(cpu=cpu_processes())
    recipe = training_recipe(cfg.model)
    source, _, _ = open_training_data(recipe, quiet=True)  # without the ids it was trained without
    already = excluded_ids(recipe.exclude, recipe.ledger)
    retain, forget = cfg.request.split(source)
    forget_ids = sorted(it.id for it in forget.items)
    request_id = cfg.request.request_id or default_request_id(forget_ids)
    ledger = Ledger(cfg.ledger) if cfg.ledger else None
    if ledger is not None:
        done = ledger.find(request_id)
        if done is not None:
            if done.get("forget_ids_sha256") != ids_sha256(forget_ids):
                raise UsageError(f"request id '{request_id}' is in the ledger for a different set of ids")
            where = done["model_after"]["path"]
            log(f"request {request_id} was carried out at {done['time']} ({where}): nothing to do")
            return {**done, "already_done": True}
    original = create_classifier(cfg.model)
    method = cfg.method or ("head" if original.frozen else "retrain")
    _check_method(method, original)
    if method == "retrain":
        recipe = _same_global_batch(recipe, cfg.model, state.num_processes)
    verdict = judge(method, cfg.model, retain, forget_ids, allow_changed_data=cfg.allow_changed_data)
    out = Path(cfg.output)
    if method != "retrain":  # retrain's run folder is checked and created by finetune
        RunDir(out, overwrite=cfg.overwrite)
    log(f"forgetting {len(forget)} of {len(source)} training items of '{source.name}' with {method}")
    all_forgotten = sorted(already | set(forget_ids))
    main_process = state.is_main_process
    if method != "retrain" and not main_process:
        return {}  # under `accelerate launch` only retraining uses every process
    t0 = time.perf_counter()
    if method == "retrain":
        model, settings = _retrain(cfg, recipe, all_forgotten)
        if not main_process:
            return {}  # one process writes the record, audits and appends to the ledger
    elif method == "head":
        model, settings = _refit_head(original, retain, forget_ids, recipe), {"head": recipe.head}
    else:
        model, settings = _approximate(cfg, method, original, retain, forget, recipe)
    _write_run(out, recipe, all_forgotten, None if method == "retrain" else model, cfg.overwrite)
    items = _output_items(method, original, verdict)
    if items is not None:
        RunDir(out, resume=True).save_digest(items)
    wall_s = round(time.perf_counter() - t0, 3)
    record = {
        "request_id": request_id,
        "request": cfg.request.describe(),
        "forget_ids": forget_ids,
        "forget_ids_sha256": ids_sha256(forget_ids),
        "num_forgotten": len(forget_ids),
        "method": method,
        **verdict.record(),
        "data_check": verdict.data_check,
        "settings": settings,
        "seed": cfg.seed,
        "data": {"spec": recipe.data, "split": recipe.split, "train": len(source), "retain": len(retain)},
        "original": str(cfg.model),
        "model_before": {"path": str(cfg.model), "sha256": model_digest(Path(cfg.model) / "classifier")},
        "model_after": {"path": str(out), "sha256": model_digest(out / "classifier")},
        "wall_s": wall_s,
        "cvfm_version": cvfm.__version__,
    }
    if cfg.audit:
        record["audit"] = _audit(cfg, recipe, model, original, retain, forget, source, out)
    write_json(out / "unlearn.json", {k: v for k, v in record.items() if k != "forget_ids"})
    if ledger is not None:
        record = ledger.append(record)
    return record


def _check_method(method: str, original: Classifier) -> None:
    from cvfm.unlearn.methods import METHODS

    if method not in (*EXACT_METHODS, *METHODS):
        choices = ", ".join((*EXACT_METHODS, *METHODS))
        raise UsageError(f"unknown unlearning method '{method}' (choose from: {choices})")
    if method == "head" and not original.frozen:
        raise UsageError(
            "--method head is exact only for a classifier whose backbone was frozen (finetune --freeze or "
            "--head knn); this backbone was fine-tuned on the data: use retrain, or an approximate method"
        )
    if method not in EXACT_METHODS and isinstance(original.head, KnnHead):
        raise UsageError("a k-NN classifier forgets exactly and in seconds with --method head")


def _same_global_batch(recipe: FinetuneConfig, model: str, world: int) -> FinetuneConfig:
    """`recipe` with the per-process batch that makes the global batch of `model`'s training on this
    run's number of processes (`--batch-size` is per process): the exact retrain of a 2-process run on
    one process takes twice the batch; a global batch the processes cannot share evenly is refused."""
    if recipe.frozen:  # features and a head fitted on one process: no batch to share
        return recipe
    resolved = json.loads((Path(model) / "run.json").read_text()).get("resolved", {})
    total = recipe.batch_size * resolved.get("num_processes", 1)
    if total % world:
        raise UsageError(
            f"'{model}' was trained with a global batch of {total} images; {world} processes cannot "
            f"share it evenly: retrain it with a number of processes that divides {total}"
        )
    return replace(recipe, batch_size=total // world)


def _output_items(method: str, original: Classifier, verdict: Guarantee):
    """The training items to record for the output (its data_items.jsonl): a refitted linear head's are
    the retained items as they are now; a k-NN head less its rows, or an approximately unlearned model,
    keeps the original's less the forgotten ones; a retraining has recorded its own (None)."""
    if method == "retrain":
        return None
    if method == "head" and not isinstance(original.head, KnnHead):
        return verdict.current
    return verdict.recorded


def _retrain(cfg: UnlearnConfig, recipe: FinetuneConfig, forgotten: list[str]) -> tuple[Classifier, dict]:
    """Exact: the original recipe, from its original initialisation, on the retained data.

    Under a launcher every process writes the same ids before it trains; the main process, which reads
    them again after training, removes them."""
    out = Path(cfg.output)
    staged = out.with_name(f".{out.name}.forget-ids")  # finetune refuses an occupied output folder
    write_text(staged, "".join(f"{i}\n" for i in forgotten))
    try:
        retrain = replace(
            recipe, output=str(out), exclude=str(staged), overwrite=cfg.overwrite, resume=cfg.resume
        )
        finetune(retrain)
    finally:
        if PartialState().is_main_process:
            staged.unlink(missing_ok=True)
    settings = {
        k: v for k, v in asdict(recipe).items() if k not in ("output", "exclude", "overwrite", "resume")
    }
    return create_classifier(str(out)), settings


def _refit_head(original: Classifier, retain: ImageSource, forget_ids: list[str], recipe) -> Classifier:
    """Exact for a frozen backbone: the k-NN bank without the forgotten rows, or the linear head refitted
    on the retained items exactly as `finetune --freeze` fits it."""
    if isinstance(original.head, KnnHead):
        model = copy.deepcopy(original)
        model.head = original.head.without(set(forget_ids))
        return model
    return fit_frozen_classifier(original.encoder, retain, recipe, classes=original.classes)


def _approximate(cfg, name, original, retain, forget, recipe) -> tuple[Classifier, dict]:
    from cvfm.unlearn.loop import run_unlearning
    from cvfm.unlearn.methods import build_unlearn_method

    options = dict(cfg.options)
    if cfg.epochs is not None:
        options["epochs"] = str(cfg.epochs)
    method = build_unlearn_method(name, options)
    epochs = method.resolve_epochs(recipe.epochs)
    model = copy.deepcopy(original)
    if original.frozen:  # the backbone never saw the data: only the head changes
        model.encoder.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    device = default_device()
    if device == "cpu":
        share_cores_with_workers(cfg.num_workers)
    logs = run_unlearning(
        model,
        method,
        retain,
        forget,
        transform=train_transform(model.preprocess, recipe.augment),
        batch_size=recipe.batch_size,
        epochs=epochs,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        device=device,
        num_classes=model.num_classes,
    )
    model.requires_grad_(True)
    settings = {**method.settings(), "epochs": epochs, "batch_size": recipe.batch_size, "logs": logs}
    return model.cpu().eval(), settings


def _write_run(
    out: Path, recipe: FinetuneConfig, forgotten: list[str], model: Classifier | None, overwrite: bool
):
    """The output as a classifier run: classifier/ (`model`; None when retraining already wrote the run),
    forgotten_ids.txt, and run.json whose recipe leaves out every id forgotten so far, so that a later
    `retrain` from this output is exact too."""
    if model is None:
        run = RunDir(out, resume=True)
    else:
        run = RunDir(out, overwrite=overwrite).create()
        save_atomically(model, out / "classifier")
    ids_file = write_text(out / "forgotten_ids.txt", "".join(f"{i}\n" for i in forgotten))
    final = replace(recipe, exclude=str(ids_file.resolve()), output=str(out))
    run.update(finetune=finetune_recipe(final), status="finished")


def _audit(cfg, recipe, model, original, retain, forget, source, out: Path) -> dict:
    from cvfm.unlearn.audit import audit
    from cvfm.unlearn.plot import plot_attack_scores

    test = open_source(
        recipe.data, split=cfg.test_split, image_column=recipe.image_column, label_column=recipe.label_column
    )
    test = relabel(test, source.classes, what="training data")
    test, forget_test = cfg.request.split_test(test, source)
    device = default_device()
    common = dict(
        retain=retain,
        forget=forget,
        test=test,
        forget_test=forget_test,
        transform=model.preprocess.transform(),
        num_workers=cfg.num_workers,
        device=device,
        seed=cfg.seed,
    )
    after = audit(model, **common)
    before = audit(original, **common)
    plot_attack_scores(out / "attack_scores.png", before=before, after=after)
    pick = lambda m: {k: m[k] for k in AUDIT_KEYS if k in m}  # noqa: E731
    return {"after": pick(after), "before": pick(before)}
