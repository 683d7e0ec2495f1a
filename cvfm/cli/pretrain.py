"""`cvfm pretrain`: self-supervised pre-training of a registry backbone, CLIP on image-text pairs, or BLIP's
captioner / filter fine-tuning (before CapFilt)."""

from __future__ import annotations

import typer

from cvfm.cli import common


def pretrain(
    data: str = typer.Option(None, "--data", "-d", help=common.DATA_HELP + " Not needed with --resume."),
    output: str = common.RunOutput,
    method: str = typer.Option(
        "dino",
        "--method",
        "-m",
        help="simclr, byol, dino; ibot, dinov2 (DINO + masked patch tokens) and mae (masked autoencoder), "
        "on a ViT; sscd (a copy-detection descriptor, for curate dedup); clip (image-text); blip-captioner, "
        "blip-filter (BLIP fine-tuning); supervised (a classifier on the labels, as cvfm finetune).",
    ),
    model: str = typer.Option(
        None,
        "--model",
        help="Registry id of the backbone (default cvfm/tiny-resnet; ibot, dinov2, mae: a ViT, default "
        "cvfm/tiny-vit); "
        "for clip an image-text model (default cvfm/tiny-clip), or any image encoder with --text-model; "
        "for blip-* a BLIP model, loaded with its weights (default cvfm/tiny-blip; hf/<BLIP repo>, a folder "
        "or a blip-* run).",
    ),
    text_model: str = typer.Option(
        None,
        "--text-model",
        help="clip: an image-text model whose text tower is trained with the --model image encoder "
        "(a linear projection joins them), e.g. cvfm/tiny-clip.",
    ),
    pretrained: bool = common.pretrained_option(False, " blip-* always start from the model's weights."),
    split: str = typer.Option(None, "--split", help="Split of the data to train on (e.g. train)."),
    epochs: int = typer.Option(10, "--epochs", min=1),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=2, help="Per process."),
    lr: float = typer.Option(
        None,
        "--lr",
        help="Peak learning rate (default: method's base lr x sqrt(batch / 256); "
        "supervised: 0.1 x batch / 256; mae: 1.5e-4 x batch / 256, as the MAE paper).",
    ),
    grad_accum: int = common.GradAccum,
    precision: str = common.TrainPrecision,
    seed: int = typer.Option(0, "--seed"),
    num_workers: int = common.RunWorkers,
    checkpoint_every: int = common.CheckpointEvery,
    monitor: str = typer.Option(None, "--monitor", help="Labelled data for an online k-NN each epoch."),
    log: list[str] = common.Log,
    opt: list[str] = typer.Option(None, "--opt", help="Method option key=value, e.g. --opt local_crops=4."),
    image_column: str = common.ImageColumn,
    label_column: str = common.LabelColumn,
    text_column: str = typer.Option(
        None,
        "--text-column",
        help="clip, blip-*: the caption field of a .jsonl / column of an hf: dataset (default 'text'; "
        "'caption' for builtin:*-captions).",
    ),
    exclude: str = common.Exclude,
    ledger: str = common.Ledger,
    strict: bool = common.Strict,
    overwrite: bool = common.RunOverwrite,
    resume: bool = common.Resume,
) -> None:
    """Pre-train a backbone without labels (SimCLR, BYOL, DINO, iBOT, DINOv2, MAE), or an image-text model
    (CLIP); fine-tune BLIP's captioner (LM loss) or filter (ITC + ITM with hard negatives) on clean pairs,
    as BLIP does before CapFilt.

    Writes run.json, metrics.jsonl, curves.png, checkpoints/ and backbone/ (safetensors, loadable as
    --model <run folder> and by timm.create_model('local-dir:<run>/backbone'); for clip the whole
    image-text model, in its own layout; with --text-model backbone/ holds paired.json, image/ (the
    image encoder's layout), text/ and heads.safetensors; for blip-captioner / blip-filter the fine-tuned
    captioner / matcher, which `cvfm capfilt` and create_captioner / create_matcher load from the run
    folder; for ibot / dinov2 / mae the encoder alone (no heads, mask token or decoder: they stay in
    checkpoints/); --opt reconstructions=N adds
    reconstructions.png: N images, masked and reconstructed). Prints the run folder.
    Ctrl-C or SIGTERM writes a checkpoint first. --resume continues from the last whole checkpoint (also
    after a kill) and ends with the weights of an uninterrupted run: bit for bit on CPU, where the run keeps
    its CPU thread count whatever --num-workers; on GPU as far as its CUDA kernels are deterministic.
    --exclude / --ledger leave ids out of the data (run.json records how many and their SHA-256).

    Examples:

      cvfm pretrain --data builtin:animal-mnist --split train --method dino --epochs 5 -o runs/dino

      cvfm pretrain --data photos/ --model timm/resnet18 --method simclr --precision bf16 -o runs/simclr

      cvfm pretrain -d builtin:animal-mnist --split train -m mae --opt reconstructions=8 -o runs/mae

      cvfm pretrain -d builtin:animal-mnist --split train -m dinov2 --opt sinkhorn_knopp=false -o runs/dinov2

      cvfm pretrain --data photos/ --method sscd --epochs 30 -o runs/copy-detector

      cvfm pretrain --data builtin:animal-captions --split train --method clip -o runs/clip

      cvfm pretrain --data pairs.jsonl --method clip --text-column caption -o runs/clip

      cvfm pretrain -d pairs.jsonl -m clip --model timm/resnet18 --text-model cvfm/tiny-clip -o runs/paired

      cvfm pretrain -d builtin:animal-captions --split train -m blip-filter --epochs 2 -o runs/filter

      cvfm pretrain -d pairs.jsonl -m blip-captioner --opt prompt="a photo of " -o runs/captioner

      accelerate launch -m cvfm pretrain --data photos/ --method byol -o runs/byol

      cvfm pretrain --data photos/ --method dino --ledger deletions.jsonl -o runs/dino2

      cvfm pretrain -o runs/dino --resume
    """
    from cvfm.cli.output import emit_run
    from cvfm.errors import UsageError
    from cvfm.pretrain import PretrainConfig
    from cvfm.pretrain import pretrain as run_pretrain

    if not data and not resume:
        raise UsageError("--data is required (unless --resume continues an existing run)")
    cfg = PretrainConfig(
        data=data or "",
        output=output,
        method=method,
        model=model,
        text_model=text_model,
        pretrained=pretrained,
        split=split,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        grad_accum=grad_accum,
        precision=precision,
        seed=seed,
        num_workers=num_workers,
        checkpoint_every=checkpoint_every,
        monitor=monitor,
        log=tuple(log),
        options=common.parse_options(opt),
        image_column=image_column,
        label_column=label_column,
        text_column=text_column,
        strict=strict,
        overwrite=overwrite,
        resume=resume,
        exclude=exclude,
        ledger=ledger,
    )
    path = run_pretrain(cfg)
    emit_run(path, "classifier" if (path / "classifier").is_dir() else "backbone")  # supervised: classifier/


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)
