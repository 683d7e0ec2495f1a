"""`cvfm evaluate knn|linear|zeroshot|retrieval|segmentation|unlearning`: frozen-feature probes, image-text
evaluations, promptable segmentation and the unlearning audit; one JSON line per result."""

from __future__ import annotations

import typer

from cvfm.cli import common

app = typer.Typer(
    help="Evaluate a frozen encoder (k-NN and linear probes, zero-shot classification, image-text "
    "retrieval), a promptable segmenter, or audit an unlearned classifier.",
    no_args_is_help=True,
)

Model = typer.Argument(
    ..., help="Registry id or run folder, e.g. cvfm/tiny-resnet, runs/dino, hf/facebook/dinov2-small."
)
TestData = typer.Option(None, "--test-data", help="Separate test data (default: the test split of --data).")
TrainSplit = typer.Option("train", "--train-split", help="Split used as k-NN bank / probe training set.")
TestSplit = typer.Option("test", "--test-split", help="Split that is scored.")
Output = typer.Option("-", "--output", help="Append the JSON line to this file instead of stdout.")
Pretrained = common.pretrained_option(True)


def _run(task: str, *, output: str, train_split: str, test_split: str, k=None, **kw) -> None:
    """Map CLI values onto `cvfm.eval.run.evaluate` ('' means no split) and emit its JSON line."""
    from cvfm.cli.output import emit
    from cvfm.eval.run import evaluate

    if k is not None:
        kw["ks"] = tuple(k)
    record = evaluate(task, train_split=train_split or None, test_split=test_split or None, **kw)
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
    pretrained: bool = Pretrained,
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
    pretrained: bool = Pretrained,
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


DualModel = typer.Argument(
    ...,
    help="Image-text model: cvfm/tiny-clip, hf/<clip-like repo> (CLIP, SigLIP), open_clip/<arch>:<tag> "
    "or a folder holding one.",
)
Split = typer.Option("test", "--split", help="Split that is scored ('' for all records: no split).")
Precision = typer.Option(
    "auto", "--precision", help="Inference precision: auto, fp32, bf16 or fp16 (auto: bf16 where native)."
)


def _run_vl(task: str, *, output: str, split: str, **kw) -> None:
    """Map CLI values onto `cvfm.eval.vl_run` ('' means no split) and emit its JSON line."""
    from cvfm.cli.output import emit
    from cvfm.eval import vl_run

    if "recall_k" in kw:
        kw["ks"] = tuple(kw.pop("recall_k"))
    evaluate = vl_run.evaluate_zeroshot if task == "zeroshot" else vl_run.evaluate_retrieval
    emit(evaluate(split=split or None, **kw), output)


@app.command("zeroshot")
def zeroshot(
    model: str = DualModel,
    data: str = common.Data,
    split: str = Split,
    classnames: str = typer.Option(
        None,
        "--classnames",
        help="Class names in label order: a file (one per line) or comma-separated (default: the data's).",
    ),
    templates: str = typer.Option(
        None,
        "--templates",
        help="Prompt templates with {c}: a file (one per line) or one template "
        "(default: the data's own, else 'a photo of a {c}.').",
    ),
    batch_size: int = typer.Option(256, "--batch-size", "-b", min=1),
    num_workers: int = common.Workers,
    precision: str = Precision,
    seed: int = typer.Option(0, "--seed"),
    pretrained: bool = Pretrained,
    image_column: str = common.ImageColumn,
    label_column: str = common.LabelColumn,
    strict: bool = common.Strict,
    trust_remote_code: bool = common.TrustRemoteCode,
    output: str = Output,
) -> None:
    """Zero-shot classification: class names in prompt templates make a text classifier
    (acc1, acc5, mean_per_class_recall; clip_benchmark's zeroshot_classification).

    Examples:

      cvfm evaluate zeroshot cvfm/tiny-clip --data builtin:animal-captions --split test

      cvfm evaluate zeroshot hf/openai/clip-vit-base-patch32 --data photos/val --split '' \\
        --classnames classes.txt --templates templates.txt
    """
    _run_vl("zeroshot", **locals())


@app.command("retrieval")
def retrieval(
    model: str = DualModel,
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="Image-text records: a .jsonl manifest, hf:<dataset> or builtin:<name>-captions.",
    ),
    text_column: str = typer.Option(
        "caption", "--text-column", help="Field holding each record's caption (a string or a list)."
    ),
    split: str = Split,
    recall_k: list[int] = typer.Option(
        [1, 5, 10], "--recall-k", help="k of recall@k; repeat for several (--recall-k 1 --recall-k 5)."
    ),
    batch_size: int = typer.Option(256, "--batch-size", "-b", min=1),
    num_workers: int = common.Workers,
    precision: str = Precision,
    seed: int = typer.Option(0, "--seed"),
    pretrained: bool = Pretrained,
    image_column: str = common.ImageColumn,
    strict: bool = common.Strict,
    trust_remote_code: bool = common.TrustRemoteCode,
    output: str = Output,
) -> None:
    """Image-text retrieval recall@k both ways (clip_benchmark's zeroshot_retrieval):
    image_retrieval_recall@k is text -> image, text_retrieval_recall@k is image -> text (a hit when
    any of the image's captions is in the top k). Records with the same image are one image.

    Examples:

      cvfm evaluate retrieval cvfm/tiny-clip --data builtin:animal-captions --split test

      cvfm evaluate retrieval hf/openai/clip-vit-base-patch32 --data pairs.jsonl --text-column text --split ''
    """
    _run_vl("retrieval", **locals())


@app.command("segmentation")
@common.with_auto_settings
def segmentation(
    model: str = typer.Argument(
        ..., help="Promptable segmenter: cvfm/tiny-sam, hf/<SAM or SAM-HQ repo> or a folder holding one."
    ),
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="Images with instance masks: builtin:animal-scenes, a COCO instances .json, or a folder with "
        "images/<name>.<ext> and masks/<name>.png (one instance id per pixel value, 0 background).",
    ),
    split: str = typer.Option(
        None,
        "--split",
        help="Split scored: a built-in split (default test) or a sub-folder of a mask folder "
        "(default: none); a COCO file has none.",
    ),
    image_root: str = typer.Option(
        None, "--image-root", help="Folder of a COCO file's images (default: beside it, or its images/)."
    ),
    prompts: str = typer.Option(
        "center,box,clicks",
        "--prompts",
        help="Comma-separated prompts to score: center, box, clicks, auto (automatic masks, below).",
    ),
    limit: int = typer.Option(None, "--limit", min=1, help="Score the first N images only."),
    max_clicks: int = typer.Option(20, "--max-clicks", min=5, help="Click budget (NoC's cap)."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", min=1, help="Images embedded at once."),
    num_workers: int = typer.Option(0, "--num-workers", min=0, help="DataLoader worker processes."),
    seed: int = typer.Option(0, "--seed", help="Seeds the box jitter."),
    pretrained: bool = Pretrained,
    strict: bool = common.Strict,
    trust_remote_code: bool = common.TrustRemoteCode,
    output: str = Output,
    settings=None,
) -> None:
    """Promptable segmentation: each object prompted from its ground truth. center: one click at its
    centre (mIoU of the most confident of 3 masks, of the best of them, and the gap); box: its tight box,
    exact and jittered (10% of the side per coordinate, at most 20 px); clicks: simulated corrective clicks
    with the previous mask fed back (mIoU after 1, 3, 5 clicks, NoC@85/90 capped at --max-clicks, NoF).
    auto: SAM's automatic masks (the generator's knobs below) as object proposals, class-agnostic mask
    AR@10/100/1000 by COCO's evaluation, ranked by predicted IoU.

    Examples:

      cvfm evaluate segmentation cvfm/tiny-sam --data builtin:animal-scenes --limit 50

      cvfm evaluate segmentation hf/facebook/sam-vit-base --data coco/instances_val2017.json \\
        --image-root coco/val2017 --prompts box,clicks --limit 500

      cvfm evaluate segmentation hf/facebook/sam-vit-base --data builtin:animal-scenes --prompts auto
    """
    kw = {**locals(), "prompts": prompts.split(","), "split": split or None}
    del kw["output"]
    from cvfm.cli.output import emit
    from cvfm.eval.seg_run import evaluate_segmentation

    emit(evaluate_segmentation(**kw), output)


@app.command("unlearning")
def unlearning(
    model: str = typer.Argument(
        ...,
        help="Classifier to audit: a `cvfm unlearn` output, a `cvfm finetune` run or a classifier folder.",
    ),
    data: str = common.Data,
    split: str = typer.Option("train", "--split", help="Training split: cut into retain and forget."),
    test_split: str = typer.Option(
        "test", "--test-split", help="Split of unseen data (test accuracy, attacks)."
    ),
    forget: str = common.Forget,
    forget_class: list[str] = common.ForgetClass,
    forget_where: list[str] = common.ForgetWhere,
    original: str = typer.Option(
        None, "--original", help="The model before unlearning (default: the one its unlearn.json names)."
    ),
    reference: str = typer.Option(
        None, "--reference", help="A model retrained without the forget set: report the gap to it per metric."
    ),
    plot: str = typer.Option(None, "--plot", help="Write a PNG of the per-set loss distributions here."),
    max_samples: int = typer.Option(
        None, "--max-samples", min=1, help="Score a seeded random subset of retain of at most this size."
    ),
    batch_size: int = typer.Option(256, "--batch-size", "-b", min=1),
    num_workers: int = common.Workers,
    seed: int = typer.Option(0, "--seed", help="Seeds the attack's member subset and --max-samples."),
    image_column: str = common.ImageColumn,
    label_column: str = common.LabelColumn,
    strict: bool = common.Strict,
    output: str = Output,
) -> None:
    """Audit unlearning: UA (1 - forget accuracy), RA, TA, MIA-efficacy (an SVM on true-label confidence,
    retain = members, test = non-members; share of forget called non-member), the loss-threshold attack
    AUC, the gap to a retrained reference, and whether the guarantee is exact or empirical.

    Examples:

      cvfm evaluate unlearning runs/forget-cat --data builtin:animal-mnist --forget-class cat

      cvfm evaluate unlearning runs/salun --data photos.jsonl --forget erase.txt \\
        --reference runs/retrain --plot attack.png --output audit.jsonl
    """
    from cvfm.cli.output import emit
    from cvfm.unlearn.audit import evaluate_unlearning

    request = common.forget_request(forget, forget_class, forget_where)
    record = evaluate_unlearning(
        model,
        data=data,
        request=request,
        split=split or None,
        test_split=test_split or None,
        original=original,
        reference=reference,
        plot=plot,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        max_samples=max_samples,
        image_column=image_column,
        label_column=label_column,
        strict=strict,
    )
    emit(record, output)
