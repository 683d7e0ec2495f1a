"""`cvfm finetune`: train a classifier (a registry backbone and a class head) on labelled images, the model
that `cvfm unlearn` edits."""

from __future__ import annotations

import typer

from cvfm.cli import common


def finetune(
    data: str = typer.Option(None, "--data", "-d", help=common.DATA_HELP + " Needs labels."),
    output: str = common.RunOutput,
    split: str = typer.Option("train", "--split", help="Split to train on ('' for none)."),
    model: str = typer.Option(
        "cvfm/tiny-resnet",
        "--model",
        help="Registry id or folder of the backbone (e.g. timm/resnet18, runs/dino).",
    ),
    pretrained: bool = common.pretrained_option(False, " A folder's own weights are always used."),
    freeze: bool = typer.Option(
        False, "--freeze", help="Keep the backbone frozen: fit only the head on its features."
    ),
    head: str = typer.Option(
        "linear", "--head", help="linear, or knn (a k-NN bank of training features; implies --freeze)."
    ),
    epochs: int = typer.Option(30, "--epochs", min=1),
    batch_size: int = typer.Option(128, "--batch-size", "-b", min=2),
    lr: float = typer.Option(
        None,
        "--lr",
        help="Peak learning rate (default: full fine-tuning 0.1 x batch / 256 with sgd, 5e-4 x batch / 256 "
        "with adamw; frozen linear head: the linear probe's sweep on a 10% validation split).",
    ),
    weight_decay: float = typer.Option(
        None, "--weight-decay", min=0.0, help="Default: 5e-4 with sgd (every parameter), 0.05 with adamw."
    ),
    optimizer: str = typer.Option(
        "sgd",
        "--optimizer",
        help="Full fine-tuning: sgd (momentum 0.9, the unlearning papers' recipe) or adamw (MAE's "
        "fine-tuning recipe for a ViT; biases, norms, position embeddings not decayed).",
    ),
    layer_decay: float = typer.Option(
        1.0,
        "--layer-decay",
        help="Layer-wise lr decay for a timm backbone (block i of n at lr x decay^(n+1-i); MAE's ViT-B "
        "0.65, BEiT 0.65-0.75); 1: none.",
    ),
    no_augment: bool = typer.Option(
        False, "--no-augment", help="Train on the evaluation transform (no random crop and flip)."
    ),
    k: int = typer.Option(20, "--k", min=1, help="knn head: neighbours that vote."),
    temperature: float = typer.Option(0.07, "--temperature", help="knn head: vote weight exp(sim / T)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (mixed precision)."),
    seed: int = typer.Option(0, "--seed"),
    num_workers: int = common.RunWorkers,
    exclude: str = common.Exclude,
    ledger: str = common.Ledger,
    image_column: str = common.ImageColumn,
    label_column: str = common.LabelColumn,
    strict: bool = common.Strict,
    overwrite: bool = common.RunOverwrite,
    resume: bool = typer.Option(
        False, "--resume", help="Continue the fine-tuning run in --output from its last checkpoint."
    ),
) -> None:
    """Train a classifier: fine-tune the whole backbone with a linear head (cross-entropy, SGD momentum 0.9,
    lr 0.1 x batch / 256, weight decay 5e-4, cosine: the recipe of the unlearning papers' original
    models; or, for a ViT, --optimizer adamw --layer-decay 0.65: MAE's), or fit a linear or k-NN head on a
    frozen backbone's features.

    Writes run.json (the recipe under "finetune", what was left out under "excluded") and classifier/
    (classifier.json, backbone/, head.safetensors), loadable by `cvfm.registry.create_classifier(run)`;
    full fine-tuning also writes metrics.jsonl, curves.png and checkpoints/ (Ctrl-C or SIGTERM checkpoints;
    --resume, also after a kill, ends with the weights of an uninterrupted run, bit for bit on CPU).
    Prints one JSON line: run, classifier, head, frozen, classes, train_images, excluded, train_top1 (on
    the training data, evaluation transform).

    Examples:

      cvfm finetune --data builtin:digits --epochs 30 -o runs/clf

      cvfm finetune --data builtin:animal-mnist --model runs/mae --optimizer adamw --layer-decay 0.65 -o ft

      cvfm finetune --data photos/ --split '' --model timm/resnet18 --pretrained --freeze -o runs/probe

      cvfm finetune --data builtin:animal-mnist --model runs/dino --head knn -o runs/knn

      cvfm finetune --data builtin:digits --exclude forget.txt --ledger deletions.jsonl -o runs/clf2

      cvfm finetune -o runs/clf --resume
    """
    from cvfm.cli.output import emit
    from cvfm.finetune import FinetuneConfig
    from cvfm.finetune import finetune as run_finetune

    cfg = FinetuneConfig(
        data=data or "",
        output=output,
        model=model,
        pretrained=pretrained,
        split=split or None,
        image_column=image_column,
        label_column=label_column,
        head=head,
        freeze=freeze,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        optimizer=optimizer,
        layer_decay=layer_decay,
        augment=not no_augment,
        precision=precision,
        seed=seed,
        num_workers=num_workers,
        k=k,
        temperature=temperature,
        exclude=exclude,
        ledger=ledger,
        overwrite=overwrite,
        resume=resume,
        strict=strict,
    )
    path = run_finetune(cfg)
    from accelerate import PartialState

    if PartialState().is_main_process:  # one line, also under accelerate launch
        emit(summary(path))


def summary(path) -> dict:
    """The final JSON line of a finetune run, from its run.json."""
    import json
    from pathlib import Path

    from cvfm.finetune import FinetuneConfig

    record = json.loads((Path(path) / "run.json").read_text())
    recipe = FinetuneConfig(**record["finetune"])
    return {
        "run": str(path),
        "classifier": str(Path(path) / "classifier"),
        "head": recipe.head,
        "frozen": recipe.frozen,
        "classes": len(record["data"]["classes"]),
        "train_images": record["data"]["images"],
        "excluded": (record.get("excluded") or {}).get("count", 0),
        "train_top1": record.get("train_top1"),
    }


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune)
