"""`evaluate knn|linear` as a library call: features of a train and a test source, then a JSON record."""

from __future__ import annotations

import time

import torch

import cvfm
from cvfm.data.loader import SkipLog
from cvfm.data.sources import open_source, relabel
from cvfm.errors import UsageError
from cvfm.eval.features import extract_features
from cvfm.eval.knn import check_ks, knn_evaluate
from cvfm.eval.linear import linear_evaluate
from cvfm.registry import create_encoder
from cvfm.runtime.device import default_device
from cvfm.runtime.threads import share_cores_with_workers


def evaluate(
    task: str,
    model: str,
    data: str,
    *,
    test_data: str | None = None,
    train_split: str | None = "train",
    test_split: str | None = "test",
    ks: tuple[int, ...] = (20,),
    temperature: float = 0.07,
    batch_size: int = 256,
    num_workers: int = 2,
    seed: int = 0,
    image_column: str = "image",
    label_column: str | None = None,
    strict: bool = False,
    pretrained: bool = True,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> dict:
    """Score `model` on `data` with a k-NN (`task="knn"`) or linear (`task="linear"`) probe.

    The train split is the k-NN bank / probe training set; the test split (of `test_data`, else of
    `data`) is scored. Returns clip_benchmark-shaped `{"task","model","dataset","metrics",...}`.
    """
    if task not in ("knn", "linear"):
        raise UsageError(f"unknown evaluation '{task}' (choose knn or linear)")
    if task == "knn":
        check_ks(ks)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    kw = {"image_column": image_column, "label_column": label_column, "strict": strict}
    train = open_source(data, split=train_split, **kw)
    test = open_source(test_data or data, split=test_split, **kw)
    for name, src in (("train", train), ("test", test)):
        if not src.has_labels:
            raise UsageError(
                f"the {name} data '{src.name}' has unlabelled images; {task} evaluation needs labels"
            )
    test = relabel(test, train.classes, what="training data")  # folders may number classes differently
    encoder = create_encoder(model, pretrained=pretrained, trust_remote_code=trust_remote_code)
    device = default_device(device)
    if device == "cpu":
        share_cores_with_workers(num_workers)
    skips = SkipLog(strict, train.skipped + test.skipped)
    common = {"batch_size": batch_size, "num_workers": num_workers, "device": device, "skips": skips}
    xtr, ytr, _ = extract_features(encoder, train, desc="train features", **common)
    xte, yte, _ = extract_features(encoder, test, desc="test features", **common)
    if len(xtr) == 0 or len(xte) == 0:
        raise UsageError("no readable images left to evaluate on")
    if task == "knn":
        metrics = knn_evaluate(xtr, ytr, xte, yte, ks=ks, temperature=temperature)
    else:
        metrics = linear_evaluate(xtr, ytr, xte, yte, seed=seed)
    return {
        "task": task,
        "model": model,
        "dataset": test_data or data,
        "metrics": metrics,
        "seed": seed,
        "cvfm_version": cvfm.__version__,
        "wall_s": round(time.perf_counter() - t0, 3),
        "data": {"train": len(xtr), "test": len(xte), "skipped": skips.as_list()},
    }
