"""`cvfm evaluate knn|linear`: frozen-feature probes; one JSON line per result."""

from __future__ import annotations

import typer

from cvfm.cli import common

app = typer.Typer(help="Evaluate a frozen encoder: k-NN and linear probes.", no_args_is_help=True)

Model = typer.Argument(
    ..., help="Registry id or run folder, e.g. cvfm/tiny-resnet, runs/dino, hf/facebook/dinov2-small."
)
TestData = typer.Option(None, "--test-data", help="Separate test data (default: the test split of --data).")
TrainSplit = typer.Option("train", "--train-split", help="Split used as k-NN bank / probe training set.")
TestSplit = typer.Option("test", "--test-split", help="Split that is scored.")
Output = typer.Option("-", "--output", help="Append the JSON line to this file instead of stdout.")
RandomInit = typer.Option(False, "--random-init", help="Ignore pretrained weights (a random-init baseline).")


def _run(
    task: str, *, output: str, train_split: str, test_split: str, random_init: bool, k=None, **kw
) -> None:
    """Map CLI values onto `cvfm.eval.run.evaluate` ('' means no split) and emit its JSON line."""
    from cvfm.cli.app import emit
    from cvfm.eval.run import evaluate

    if k is not None:
        kw["ks"] = tuple(k)
    record = evaluate(
        task, train_split=train_split or None, test_split=test_split or None, pretrained=not random_init, **kw
    )
    emit(record, output)


@app.command("knn")
def knn(
    model: str = Model,
    data: str = common.Data,
    test_data: str = TestData,
    train_split: str = TrainSplit,
    test_split: str = TestSplit,
    k: list[int] = typer.Option([20], "--k", help="Neighbours; repeat for several (--k 10 --k 20)."),
    temperature: float = typer.Option(0.07, "--temperature", help="Vote weight exp(sim / T)."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", min=1),
    num_workers: int = common.Workers,
    seed: int = typer.Option(0, "--seed"),
    random_init: bool = RandomInit,
    image_column: str = common.ImageColumn,
    label_column: str = common.LabelColumn,
    strict: bool = common.Strict,
    trust_remote_code: bool = common.TrustRemoteCode,
    output: str = Output,
) -> None:
    """Weighted k-NN on L2-normalised features (top-1/top-5 for each k).

    Examples:

      cvfm evaluate knn runs/dino --data builtin:animal-mnist

      cvfm evaluate knn cvfm/pixels --data builtin:animal-mnist --k 10 --k 20 --k 100

      cvfm evaluate knn hf/facebook/dinov2-small --data photos/train --test-data photos/val \\
        --train-split '' --test-split ''
    """
    _run("knn", **locals())


@app.command("linear")
def linear(
    model: str = Model,
    data: str = common.Data,
    test_data: str = TestData,
    train_split: str = TrainSplit,
    test_split: str = TestSplit,
    batch_size: int = typer.Option(256, "--batch-size", "-b", min=1),
    num_workers: int = common.Workers,
    seed: int = typer.Option(0, "--seed"),
    random_init: bool = RandomInit,
    image_column: str = common.ImageColumn,
    label_column: str = common.LabelColumn,
    strict: bool = common.Strict,
    trust_remote_code: bool = common.TrustRemoteCode,
    output: str = Output,
) -> None:
    """Linear probe on frozen features; lr and weight decay swept on a 10% validation split.

    Examples:

      cvfm evaluate linear runs/dino --data builtin:animal-mnist

      cvfm evaluate linear cvfm/tiny-resnet --data builtin:animal-mnist --output results.jsonl
    """
    _run("linear", **locals())
