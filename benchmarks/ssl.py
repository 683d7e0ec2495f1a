"""Self-supervised pre-training benchmark: quality at a fixed budget, and training-step speed vs lightly.

Run from the repository root with the venv active (lightly is the `bench` extra, installed --no-deps):

    HF_HUB_OFFLINE=1 python benchmarks/ssl.py --quick                 # smoke test on builtin:digits, < 2 min
    HF_HUB_OFFLINE=1 python benchmarks/ssl.py                         # default budget on builtin:animal-mnist
    HF_HUB_OFFLINE=1 python benchmarks/ssl.py --epochs 10 --methods simclr,byol --json out.json
    HF_HUB_OFFLINE=1 python benchmarks/ssl.py --skip-quality          # only the step-speed comparison
    HF_HUB_OFFLINE=1 nohup python benchmarks/ssl.py --json /tmp/ssl.json > /tmp/ssl_bench.log 2>&1 &

Part 1 (quality): for each method, `pretrain(...)` cvfm/tiny-resnet from random init (seed 0) on the train
split, then `evaluate("knn" | "linear", run, data)` (train split = bank / probe training set, test split
scored). Baselines: the same random-init encoder (presets are seeded by torch.manual_seed, and pretrain
and evaluate both seed 0 before building the encoder, so "random init" is the exact starting point of
every run) and raw pixels (cvfm/pixels). "gain" is top-1 minus random init's, in points. The default
budget is 20 epochs of batch 64 per method (2 to 4 minutes each on a 2-core CPU), with DINO on its 2
global crops only, instead of cvfm's default 2 + 8 local: at 32 px the 14-px local crops cost more than
they teach in a short run (20 epochs with 2 local crops: k-NN +3.55, linear +9.55; without: +6.90 /
+12.80), and they slow the augmenting loader workers. --dino-local-crops 8 runs the full recipe.

BYOL and DINO run with SHORT_RUN options: a slower EMA target (BYOL 0.999, DINO 0.9995) and milder crops
(BYOL min scale 0.5, DINO global crops 0.6-1). With the papers' defaults, a few thousand steps collapse
their features onto a handful of directions (effective rank ~4-5 of 128, against 16 at random init and
12 for SimCLR), which drags k-NN below random init; the slow target keeps it at 9-11.
--paper-defaults runs cvfm's defaults instead. --lr and --opt exist to explore.

Part 2 (step speed): cvfm's method module and an equivalent lightly model (the same timm backbone and
weights, lightly's heads sized like cvfm's resolved config, lightly's loss and EMA helper, the same AdamW
parameter groups) train on the same pre-made random batch of views. cvfm's encoder feeds conv nets
channels_last (NHWC); lightly gets the plain timm model, as its users write it, and once more (concat) the
cvfm encoder, which isolates what the layout is worth from the method code. One step = forward, backward,
gradient clipping (DINO), optimizer step, EMA update, `float(loss)`. Contenders alternate step by step
after warm-up; steps/s is 1 / median step time. lightly is run two ways: one forward per view, as in
lightly's examples ("per view"), and with same-size views concatenated into one forward, as cvfm does
("concat"); BatchNorm statistics differ between the two, the arithmetic is otherwise the same.

Everything runs with `torch.set_num_threads(--threads)`. The default of 1 is deliberate: on a small CPU
with 2 loader workers (and other work), more intra-op threads than free cores make every op wait on
the thread pool and slow the step several times over. Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

# This file is named ssl.py: run as a script, its folder heads sys.path and would shadow the standard
# library's `ssl` (which torch imports through asyncio). Drop that entry before importing anything else.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402
from torch import nn  # noqa: E402

DEFAULT_METHODS = ("simclr", "byol", "dino")


# --------------------------------------------------------------------------------------------- helpers


def fmt_table(headers: list[str], rows: list[list], title: str = "") -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values):
        pairs = enumerate(zip(values, widths, strict=True))
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in pairs)

    out = [title] if title else []
    out += [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0 or abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.2e}"
    return str(v)


def say(*parts) -> None:
    print(*parts, flush=True)


def versions() -> dict:
    import lightly
    import torchvision

    from cvfm.runtime.trainer import versions as cvfm_versions

    return {**cvfm_versions(), "torchvision": torchvision.__version__, "lightly": lightly.__version__}


# Short CPU runs on 32-px images; see the module docstring and the README's benchmark section.
SHORT_RUN = (
    "byol.momentum=0.999",
    "byol.min_scale=0.5",
    "dino.momentum_teacher=0.9995",
    "dino.global_scale=0.6,1",
)


def method_options(name: str, args) -> dict:
    opts = {}
    if name == "dino" and args.dino_local_crops is not None:
        opts["local_crops"] = str(args.dino_local_crops)
    for item in (() if args.paper_defaults else SHORT_RUN) + tuple(args.opt):
        key, _, value = item.partition("=")
        method, _, key = key.rpartition(".")
        if method in ("", name):
            opts[key] = value
    return opts


# --------------------------------------------------------------------------------------- part 1: quality


def last_epoch_record(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r for r in records if "images_per_s" in r]
    return epochs[-1] if epochs else {}


def score(model: str, data: str, args) -> tuple[float, float, float]:
    """(k-NN top-1 %, linear top-1 %, eval seconds) through cvfm's own `evaluate`."""
    from cvfm.eval.run import evaluate

    t0 = time.perf_counter()
    knn = evaluate("knn", model, data, num_workers=args.num_workers)["metrics"]
    linear = evaluate("linear", model, data, num_workers=args.num_workers)["metrics"]
    return 100 * knn["knn_top1@20"], 100 * linear["linear_top1"], time.perf_counter() - t0


def quality(args, workdir: Path) -> list[dict]:
    from cvfm.runtime.trainer import PretrainConfig, pretrain

    rows = []
    for label, model in (("random init", "cvfm/tiny-resnet"), ("raw pixels", "cvfm/pixels")):
        say(f"[quality] evaluating {label} ({model}) ...")
        torch.manual_seed(0)  # the init pretrain starts from (evaluate also seeds 0 before building it)
        knn, lin, ev = score(model, args.data, args)
        rows.append({"method": label, "model": model, "knn_top1": knn, "linear_top1": lin, "eval_s": ev})
    base = rows[0]
    for name in args.methods:
        opts = method_options(name, args)
        say(f"[quality] pre-training {name} for {args.epochs} epoch(s) on {args.data} (options {opts}) ...")
        out = workdir / name
        t0 = time.perf_counter()
        cfg = PretrainConfig(
            data=args.data,
            split="train",
            method=name,
            model="cvfm/tiny-resnet",
            epochs=args.epochs,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            output=str(out),
            options=opts,
            lr=args.lr,
            overwrite=True,  # only ever <workdir>/<method>: a re-run with the same --workdir replaces it
        )
        run = pretrain(cfg)
        wall = time.perf_counter() - t0
        last = last_epoch_record(run)
        info = json.loads((run / "run.json").read_text())
        say(f"[quality] evaluating {name} ...")
        knn, lin, ev = score(str(run), args.data, args)
        rows.append(
            {
                "method": name,
                "model": str(run),
                "options": opts,
                "epochs": args.epochs,
                "knn_top1": knn,
                "linear_top1": lin,
                "eval_s": ev,
                "pretrain_images_per_s": last.get("images_per_s"),
                "pretrain_s": wall,
                "final_loss": last.get("epoch/loss"),
                "feature_std": last.get("epoch/feature_std"),
                "teacher_entropy": last.get("epoch/teacher_entropy"),
                "lr": info["resolved"]["lr"],
                "total_steps": info["resolved"]["total_steps"],
                "method_config": info["method_config"],
            }
        )
    for r in rows:
        r["knn_gain"] = None if r is base else r["knn_top1"] - base["knn_top1"]
        r["linear_gain"] = None if r is base else r["linear_top1"] - base["linear_top1"]
    return rows


def quality_table(rows: list[dict], args) -> str:
    headers = [
        "method",
        "epochs",
        "lr",
        "k-NN@20 top-1 %",
        "linear top-1 %",
        "k-NN gain pts",
        "linear gain pts",
        "pretrain img/s",
        "pretrain s",
        "eval s",
        "final loss",
        "feat std",
    ]
    body = [
        [
            r["method"],
            r.get("epochs"),
            r.get("lr"),
            r["knn_top1"],
            r["linear_top1"],
            r["knn_gain"],
            r["linear_gain"],
            r.get("pretrain_images_per_s"),
            r.get("pretrain_s"),
            r["eval_s"],
            r.get("final_loss"),
            r.get("feature_std"),
        ]
        for r in rows
    ]
    title = (
        f"Quality at a fixed budget: cvfm/tiny-resnet on {args.data} (train split -> test split), "
        f"batch {args.batch_size}, {args.num_workers} loader workers, {args.threads} torch thread(s); "
        "gains are over random init"
    )
    opts = {r["method"]: r["options"] for r in rows if r.get("options")}
    if opts:
        title += f"; method options {opts}"
    return fmt_table(headers, body, title)


# ---------------------------------------------------------------------------- part 2: step throughput


def param_groups(model: nn.Module) -> list[dict]:
    """cvfm's grouping (no weight decay on biases and norm weights), applied to the lightly model too."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class LightlySimCLR(nn.Module):
    def __init__(self, backbone, cfg, concat: bool):
        from lightly.loss import NTXentLoss
        from lightly.models.modules.heads import SimCLRProjectionHead

        super().__init__()
        self.backbone, self.concat = backbone, concat
        self.projection_head = SimCLRProjectionHead(backbone.num_features, cfg.proj_hidden, cfg.proj_dim)
        self.criterion = NTXentLoss(temperature=cfg.temperature)

    def forward(self, views, step):
        if self.concat:
            z0, z1 = self.projection_head(self.backbone(torch.cat(views[:2]))).chunk(2)
        else:
            z0, z1 = (self.projection_head(self.backbone(v)) for v in views[:2])
        return self.criterion(z0, z1)

    def after_step(self, step, momentum):
        pass


class LightlyBYOL(nn.Module):
    def __init__(self, backbone, cfg, concat: bool):
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone, self.concat = backbone, concat
        self.projection_head = BYOLProjectionHead(backbone.num_features, cfg.proj_hidden, cfg.proj_dim)
        self.prediction_head = BYOLPredictionHead(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def online(self, x):
        return self.prediction_head(self.projection_head(self.backbone(x)))

    def target(self, x):
        return self.projection_head_momentum(self.backbone_momentum(x)).detach()

    def forward(self, views, step):
        x0, x1 = views[:2]
        if self.concat:
            x = torch.cat([x0, x1])
            p0, p1 = self.online(x).chunk(2)
            with torch.no_grad():
                z0, z1 = self.target(x).chunk(2)
        else:
            p0, p1 = self.online(x0), self.online(x1)
            with torch.no_grad():
                z0, z1 = self.target(x0), self.target(x1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

    def after_step(self, step, momentum):
        from lightly.models.utils import update_momentum

        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)


class LightlyDINO(nn.Module):
    clip_grad = 3.0

    def __init__(self, backbone, cfg, concat: bool, steps_per_epoch: int):
        from lightly.loss import DINOLoss
        from lightly.models.modules.heads import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.concat, self.steps_per_epoch = concat, steps_per_epoch
        dims = (backbone.num_features, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim)
        self.student_backbone = backbone
        self.student_head = DINOProjectionHead(*dims, batch_norm=cfg.head_bn, freeze_last_layer=1)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = DINOProjectionHead(*dims, batch_norm=cfg.head_bn)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(
            output_dim=cfg.out_dim,
            warmup_teacher_temp=cfg.warmup_teacher_temp,
            teacher_temp=cfg.teacher_temp,
            student_temp=cfg.student_temp,
            center_momentum=cfg.center_momentum,
        )
        self.teacher_temp = cfg.teacher_temp

    def forward(self, views, step):
        globals_ = views[:2]
        if self.concat:
            with torch.no_grad():
                teacher_out = list(self.teacher_head(self.teacher_backbone(torch.cat(globals_))).chunk(2))
            feats = [self.student_backbone(torch.cat(globals_))]
            if len(views) > 2:
                feats.append(self.student_backbone(torch.cat(views[2:])))
            student_out = list(self.student_head(torch.cat(feats)).chunk(len(views)))
        else:
            with torch.no_grad():
                teacher_out = [self.teacher_head(self.teacher_backbone(v)) for v in globals_]
            student_out = [self.student_head(self.student_backbone(v)) for v in views]
        return self.criterion(teacher_out, student_out, teacher_temp=self.teacher_temp)

    def before_optimizer_step(self, step):
        self.student_head.cancel_last_layer_gradients(current_epoch=step // self.steps_per_epoch)

    def after_step(self, step, momentum):
        from lightly.models.utils import update_momentum

        update_momentum(self.student_backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.student_head, self.teacher_head, m=momentum)


LIGHTLY = {"simclr": LightlySimCLR, "byol": LightlyBYOL, "dino": LightlyDINO}


class Contender:
    """One model + optimizer + a `step(i)` that mirrors cvfm's training loop (minus data and logging)."""

    def __init__(self, label: str, model: nn.Module, optimizer, step_fn):
        self.label, self.model, self.optimizer, self.step_fn = label, model, optimizer, step_fn
        self.times: list[float] = []

    def timed_step(self, views, i: int, record: bool) -> float:
        t0 = time.perf_counter()
        loss = self.step_fn(views, i)
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
        return loss


def build_contenders(name: str, args, budget) -> tuple[list[Contender], object, list[torch.Tensor]]:
    from cvfm.methods import build_method
    from cvfm.registry import create_encoder

    torch.manual_seed(0)
    method = build_method(name, create_encoder("cvfm/tiny-resnet"), method_options(name, args), budget)
    cfg = method.cfg
    lr = args.lr or method.base_lr * budget.batch_size / 256
    wd = method.weight_decay[0]
    contenders = []

    opt = torch.optim.AdamW(method.param_groups(), lr=lr, weight_decay=wd)

    def cvfm_step(views, i, method=method, opt=opt):
        loss, _ = method(views, i)
        loss.backward()
        if method.clip_grad:
            nn.utils.clip_grad_norm_(method.parameters(), method.clip_grad)
        method.before_optimizer_step(i)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_optimizer_step(i)
        return float(loss.detach())

    contenders.append(Contender("cvfm", method, opt, cvfm_step))

    momentum_schedule = getattr(method, "momentum", None)
    # lightly trains the plain timm model (same architecture and weights), as its users write it; the
    # "NHWC" contender gets cvfm's encoder instead, which feeds conv nets channels_last like cvfm does.
    for concat, nhwc in ((False, False), (True, False), (True, True)):
        if nhwc:
            backbone = create_encoder("cvfm/tiny-resnet")
            backbone.load_state_dict(method.encoder.state_dict())
        else:
            backbone = copy.deepcopy(method.encoder.model)
        kw = {"steps_per_epoch": budget.steps_per_epoch} if name == "dino" else {}
        model = LIGHTLY[name](backbone, cfg, concat=concat, **kw)
        lopt = torch.optim.AdamW(param_groups(model), lr=lr, weight_decay=wd)

        def lightly_step(views, i, model=model, opt=lopt):
            loss = model(views, i)
            loss.backward()
            clip = getattr(model, "clip_grad", None)
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            if hasattr(model, "before_optimizer_step"):
                model.before_optimizer_step(i)
            opt.step()
            opt.zero_grad(set_to_none=True)
            m = 0.0
            if momentum_schedule is not None:
                m = float(momentum_schedule[min(i, len(momentum_schedule) - 1)])
            model.after_step(i, m)
            return float(loss.detach())

        label = ("lightly concat" if concat else "lightly per view") + (" NHWC" if nhwc else "")
        contenders.append(Contender(label, model, lopt, lightly_step))

    g = torch.Generator().manual_seed(0)
    b = args.batch_size
    shapes = [(b, 3, 32, 32)] * 2
    if name == "dino":
        shapes += [(b, 3, cfg.local_size, cfg.local_size)] * cfg.local_crops
    views = [torch.randn(s, generator=g) for s in shapes]
    return contenders, cfg, views


def throughput(args) -> list[dict]:
    from cvfm.data.sources import open_source
    from cvfm.methods import Budget

    n = len(open_source(args.data, split="train"))
    steps_per_epoch = n // args.batch_size
    budget = Budget(n, steps_per_epoch, steps_per_epoch * args.epochs, args.batch_size)
    rows = []
    for name in args.methods:
        say(f"[speed] {name}: {args.warmup} warm-up + {args.steps} timed steps per contender, alternating")
        contenders, cfg, views = build_contenders(name, args, budget)
        losses = {c.label: [] for c in contenders}
        for i in range(args.warmup + args.steps):
            k = i % len(contenders)  # rotate who goes first
            order = contenders[k:] + contenders[:k]
            for c in order:
                losses[c.label].append(c.timed_step(views, i, record=i >= args.warmup))
        med = {c.label: statistics.median(c.times) for c in contenders}
        sps = {k: 1.0 / v for k, v in med.items()}
        params = {
            c.label: sum(p.numel() for p in c.model.parameters() if p.requires_grad) for c in contenders
        }
        view_desc = f"2x32px + {cfg.local_crops}x{cfg.local_size}px" if name == "dino" else "2x32px"
        rows.append(
            {
                "method": name,
                "views": view_desc,
                "batch_size": args.batch_size,
                "cvfm_steps_per_s": sps["cvfm"],
                "lightly_per_view_steps_per_s": sps["lightly per view"],
                "lightly_concat_steps_per_s": sps["lightly concat"],
                "lightly_concat_nhwc_steps_per_s": sps["lightly concat NHWC"],
                "ratio_vs_per_view": sps["cvfm"] / sps["lightly per view"],
                "ratio_vs_concat": sps["cvfm"] / sps["lightly concat"],
                "ratio_vs_concat_nhwc": sps["cvfm"] / sps["lightly concat NHWC"],
                "median_step_ms": {k: 1000 * v for k, v in med.items()},
                "mean_step_ms": {c.label: 1000 * statistics.fmean(c.times) for c in contenders},
                "trainable_params": params,
                "first_last_loss": {k: (v[0], v[-1]) for k, v in losses.items()},
                "head_config": asdict(cfg),
            }
        )
        del contenders
    return rows


def throughput_table(rows: list[dict], args) -> str:
    headers = [
        "method",
        "views",
        "cvfm steps/s",
        "lightly per-view steps/s",
        "lightly concat steps/s",
        "lightly concat NHWC steps/s",
        "cvfm/lightly per-view",
        "cvfm/lightly concat",
        "cvfm/lightly concat NHWC",
        "cvfm img/s",
        "params cvfm",
        "params lightly",
    ]
    body = [
        [
            r["method"],
            r["views"],
            r["cvfm_steps_per_s"],
            r["lightly_per_view_steps_per_s"],
            r["lightly_concat_steps_per_s"],
            r["lightly_concat_nhwc_steps_per_s"],
            r["ratio_vs_per_view"],
            r["ratio_vs_concat"],
            r["ratio_vs_concat_nhwc"],
            r["cvfm_steps_per_s"] * r["batch_size"],
            r["trainable_params"]["cvfm"],
            r["trainable_params"]["lightly per view"],
        ]
        for r in rows
    ]
    title = (
        f"Training-step speed (forward + backward + clip + AdamW step + EMA; no data loading), batch "
        f"{args.batch_size}, {args.threads} torch thread(s), {args.steps} timed steps each after "
        f"{args.warmup} warm-up, contenders alternating; steps/s = 1 / median step time"
    )
    return fmt_table(headers, body, title)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated: simclr,byol,dino")
    p.add_argument("--epochs", type=int, default=None, help="epochs per method (default 20; quick 1)")
    p.add_argument("--data", default=None, help="default builtin:animal-mnist (quick: digits)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2, help="data-loader workers for pretrain and evaluate")
    p.add_argument(
        "--dino-local-crops",
        type=int,
        default=0,
        help="DINO local crops (default 0, the 2 global crops only; cvfm's own default is 8)",
    )
    p.add_argument("--lr", type=float, default=None, help="pretrain lr, all methods (default: cvfm's auto)")
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="[METHOD.]KEY=VALUE",
        help="method option, as cvfm's --opt (e.g. dino.momentum_teacher=0.99); repeatable",
    )
    p.add_argument(
        "--paper-defaults",
        action="store_true",
        help="BYOL and DINO with cvfm's (the papers') defaults, without the SHORT_RUN options",
    )
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the whole benchmark")
    p.add_argument("--steps", type=int, default=None, help="timed steps per contender (default 20; quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps each (default 3; quick 1)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run on builtin:digits (< 2 minutes)")
    p.add_argument("--skip-quality", action="store_true", help="only the step-speed comparison")
    p.add_argument("--skip-speed", action="store_true", help="only the quality comparison")
    p.add_argument(
        "--workdir",
        default=None,
        help="keep the run folders in WORKDIR/<method> (replaced on re-runs; default: a temporary folder)",
    )
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    args = p.parse_args(argv)
    quick = args.quick
    args.data = args.data or ("builtin:digits" if quick else "builtin:animal-mnist")
    args.epochs = args.epochs or (1 if quick else 20)
    args.steps = args.steps or (5 if quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from cvfm.methods import METHODS

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*weight_norm.*")  # lightly's DINO head uses the old API
    t0 = time.perf_counter()
    results = {
        "args": {k: v for k, v in vars(args).items()},
        "versions": versions(),
        "cpu_threads": torch.get_num_threads(),
    }
    say(f"cvfm SSL benchmark: {json.dumps(results['versions'])}; torch threads {torch.get_num_threads()}")
    tables = []
    if not args.skip_speed:
        results["speed"] = throughput(args)
        tables.append(throughput_table(results["speed"], args))
        say("\n" + tables[-1] + "\n")
    if not args.skip_quality:
        if args.workdir:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            results["quality"] = quality(args, workdir)
        else:
            with tempfile.TemporaryDirectory(prefix="cvfm-ssl-bench-") as tmp:
                results["quality"] = quality(args, Path(tmp))
        tables.append(quality_table(results["quality"], args))
    results["wall_s"] = time.perf_counter() - t0
    say("\n" + "=" * 100)
    say("\n\n".join(tables))
    say(f"\ntotal wall time {results['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        say(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
