"""`cvfm distill`: a frozen teacher into a (smaller) student backbone."""

from __future__ import annotations

import typer

from cvfm.cli import common


def distill(
    teacher: str = typer.Option(
        None,
        "--teacher",
        help="Registry id or run folder: any image encoder (feature); a `cvfm finetune` run or classifier "
        "folder (logit); a `cvfm pretrain --method dino` run folder, whose DINO head gives the "
        "targets (dino); a SAM segmenter such as cvfm/tiny-sam (sam-embedding).",
    ),
    student: str = typer.Option(
        "cvfm/tiny-resnet",
        "--student",
        help="Registry id of the student (timm/<arch> for a timm architecture).",
    ),
    data: str = typer.Option(None, "--data", "-d", help=common.DATA_HELP + " Not needed with --resume."),
    output: str = common.RunOutput,
    loss: list[str] = typer.Option(
        None,
        "--loss",
        help="feature (default), dino, logit; repeat to sum several, e.g. --loss feature --loss logit. "
        "sam-embedding (alone): the student's projected feature map against a SAM image embedding.",
    ),
    teacher_layer: str = typer.Option(
        None,
        "--teacher-layer",
        help="Feature loss on this teacher module's output (timm path, e.g. blocks.11).",
    ),
    distance: str = typer.Option("cosine", "--distance", help="Feature loss: cosine or mse."),
    standardise: bool = typer.Option(
        True,
        "--standardise/--no-standardise",
        help="Feature loss: the teacher's targets standardised per dimension by their running mean and "
        "variance (the teacher's shared mean direction is no target).",
    ),
    token_weight: float = typer.Option(1.0, "--token-weight", min=0, help="Feature loss: patch-token term."),
    temperature: float = typer.Option(4.0, "--temperature", min=1e-3, help="Logit loss: T of KL x T^2."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Random resized crop and flip."),
    cache_teacher: str = typer.Option(
        None,
        "--cache-teacher",
        help="With --no-augment: keep the teacher's outputs in this folder (safetensors, one file per view, "
        "keyed by its content's SHA-256) and reuse them in later epochs and runs.",
    ),
    pretrained: bool = common.pretrained_option(False, ""),
    split: str = typer.Option(None, "--split", help="Split of the data to train on (e.g. train)."),
    epochs: int = typer.Option(10, "--epochs", min=1),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=2, help="Per process."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default 1e-3 x sqrt(batch / 256))."),
    grad_accum: int = common.GradAccum,
    precision: str = common.TrainPrecision,
    seed: int = typer.Option(0, "--seed"),
    num_workers: int = common.RunWorkers,
    checkpoint_every: int = common.CheckpointEvery,
    log: list[str] = common.Log,
    image_column: str = common.ImageColumn,
    strict: bool = common.Strict,
    overwrite: bool = common.RunOverwrite,
    resume: bool = common.Resume,
) -> None:
    """Distil a frozen teacher into a student: feature distillation (cosine or MSE on the pooled embedding
    and the patch tokens against the teacher's, standardised per dimension; a learned projector on the
    student's side, the teacher's token grid resized to the student's), DINO-style distillation (the
    teacher's DINO head distribution as the target; the student's EMA is the result, as in DINOv2), logit
    distillation (KL x T^2) from a classifier, and MobileSAM's decoupled distillation of a SAM image encoder
    (MSE between the student's projected feature map, resized to the embedding's grid, and the SAM image
    embedding).

    The teacher runs frozen in eval mode (bf16 on a GPU that has it) on the student's views, re-sized and
    re-normalised to its own preprocessing (sam-embedding: the views are the SAM's input, re-sized for the
    student); it is never in the checkpoints or the export. Writes run.json, metrics.jsonl, curves.png,
    checkpoints/ and backbone/: the student, which --model <run folder> loads (cvfm evaluate, embed,
    finetune, unlearn). With sam-embedding and a SAM teacher also segmenter/: the student and its projection
    in place of the SAM's image encoder, with the SAM's prompt encoder and mask decoder, so that cvfm
    segment prompt|auto|train and cvfm evaluate segmentation take the run folder. Prints the run folder.
    Ctrl-C or SIGTERM writes a checkpoint first; --resume continues exactly.

    Examples:

      cvfm distill --teacher runs/dino-vit --student cvfm/tiny-resnet -d builtin:animal-mnist -o runs/kd

      cvfm distill --teacher timm/vit_small_patch14_dinov2.lvd142m --student timm/resnet18 -d pics/ -o kd

      cvfm distill --teacher runs/dino --loss dino --loss feature -d photos/ -o runs/kd-dino

      cvfm distill --teacher runs/finetuned --loss logit --loss feature -d photos/ -o runs/kd-logit

      cvfm distill --teacher cvfm/tiny-vit --teacher-layer blocks.1 -d photos/ -o runs/kd-mid

      cvfm distill --teacher hf/facebook/sam-vit-base --loss sam-embedding --student timm/resnet18 -d a/ -o b

      cvfm distill -o runs/kd --resume
    """
    from cvfm.cli.output import emit_run
    from cvfm.distill import DistillConfig
    from cvfm.distill import distill as run_distill
    from cvfm.errors import UsageError

    if not resume and not (data and teacher):
        raise UsageError("--data and --teacher are required (unless --resume continues an existing run)")
    cfg = DistillConfig(
        data=data or "",
        output=output,
        teacher=teacher or "",
        student=student,
        pretrained=pretrained,
        losses=tuple(loss or ("feature",)),
        teacher_layer=teacher_layer,
        distance=distance,
        standardise=standardise,
        token_weight=token_weight,
        temperature=temperature,
        augment=augment,
        cache_teacher=cache_teacher,
        split=split,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        grad_accum=grad_accum,
        precision=precision,
        seed=seed,
        num_workers=num_workers,
        checkpoint_every=checkpoint_every,
        log=tuple(log),
        image_column=image_column,
        strict=strict,
        overwrite=overwrite,
        resume=resume,
    )
    emit_run(run_distill(cfg))


def register(app: typer.Typer) -> None:
    app.command("distill")(distill)
