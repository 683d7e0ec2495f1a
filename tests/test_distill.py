"""`cvfm distill`: each loss against a hand computation, a short run that brings the student closer to its
frozen teacher, the teacher kept out of checkpoints and export, the run used as a backbone, logit and DINO
distillation from real `cvfm finetune` / `cvfm pretrain` runs, and --teacher-layer."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from clitools import assert_usage_error, one_json_line
from safetensors.torch import load_file

from cvfm.distill import DistillConfig, distill
from cvfm.distill import run as run_module
from cvfm.distill.losses import dino_distill, embedding_mse, feature_distance, logit_kd, resize_tokens
from cvfm.distill.method import Distill
from cvfm.distill.standardise import Standardise
from cvfm.distill.teacher import load_teacher
from cvfm.registry import create_encoder
from cvfm.runtime.checkpoint import checkpoints


def _config(out, data, **kw) -> DistillConfig:
    """128 digits, batch 32: 4 steps an epoch; checkpoints every 2 steps."""
    base = dict(data=str(data), split="train", teacher="cvfm/tiny-vit", epochs=2, batch_size=32)
    return DistillConfig(**{**base, "output": str(out), "num_workers": 0, "checkpoint_every": 2, **kw})


# ------------------------------------------------------------------------------------------ losses


def test_feature_distances_by_hand():
    s, t = torch.tensor([[1.0, 0.0], [3.0, 4.0]]), torch.tensor([[1.0, 1.0], [3.0, 4.0]])
    cos = (1 - 1 / math.sqrt(2) + 0) / 2  # row 1: cos 45 degrees; row 2: identical
    assert feature_distance(s, t, "cosine").item() == pytest.approx(cos)
    assert feature_distance(s, t, "mse").item() == pytest.approx(1 / 4)  # one squared error of 1 in 4


def test_standardise_uses_the_mean_and_variance_of_every_batch_so_far_by_hand():
    first, second = torch.tensor([[1.0, 10.0], [3.0, 10.0]]), torch.tensor([[[5.0, 13.0], [7.0, 15.0]]])
    norm = Standardise(2)
    # mean (2, 10), variance (1, 0): a constant dimension becomes 0 (eps 1e-5 keeps it finite)
    assert torch.allclose(norm(first), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), atol=1e-4)
    # all four rows: mean (4, 12), population variance (5, 4.5); tokens (B, N, D) count one row each
    want = (second[0] - torch.tensor([4.0, 12.0])) / torch.tensor([5, 4.5]).sqrt()
    assert torch.allclose(norm(second)[0], want, atol=1e-4)
    assert norm.count.item() == 4
    norm.eval()  # evaluation mode reads the statistics and leaves them
    assert torch.allclose(norm(torch.tensor([[4.0, 12.0]])), torch.zeros(1, 2)) and norm.count.item() == 4


def test_a_constant_prediction_scores_as_chance_against_standardised_targets():
    """Teacher embeddings sharing one large mean direction: a constant prediction along it is almost the
    teacher by raw cosine, as good as a random one (loss 1) once the targets are standardised; by MSE it
    scores the targets' variance, 1 a dimension, plus its own square."""
    torch.manual_seed(0)
    teacher = 5 + torch.randn(256, 16)
    constant = teacher.mean(0).expand_as(teacher)
    assert feature_distance(constant, teacher, "cosine").item() < 0.05  # the shortcut, without
    target = Standardise(16)(teacher)
    assert feature_distance(constant, target, "cosine").item() == pytest.approx(1.0, abs=0.02)
    chance = feature_distance(torch.randn(256, 16), target, "cosine").item()
    assert chance == pytest.approx(1.0, abs=0.05)
    c = torch.full((256, 16), 0.5)
    assert feature_distance(c, target, "mse").item() == pytest.approx(1 + 0.25, rel=1e-4)


def test_token_grid_resized_bilinearly():
    tokens = torch.tensor([[[0.0], [2.0], [4.0], [6.0]]])  # a 2x2 grid, one channel
    assert torch.equal(resize_tokens(tokens, (2, 2), (2, 2)), tokens)
    one = resize_tokens(tokens, (2, 2), (1, 1))
    assert one.shape == (1, 1, 1) and one.item() == pytest.approx(3.0)  # the centre: the mean of four
    wide = resize_tokens(torch.tensor([[[0.0], [4.0]]]), (1, 2), (1, 4))  # half-pixel centres, edges clamped
    assert wide.flatten().tolist() == pytest.approx([0.0, 1.0, 3.0, 4.0])


def test_logit_kd_is_kl_times_t_squared_by_hand():
    s, t, temp = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), 2.0
    p = torch.softmax(t / temp, -1)[0]  # teacher
    q = torch.softmax(s / temp, -1)[0]  # student
    kl = sum(float(p[i] * math.log(p[i] / q[i])) for i in range(2))
    assert logit_kd(s, t, temp).item() == pytest.approx(kl * temp**2, rel=1e-6)
    assert logit_kd(t, t, temp).item() == pytest.approx(0.0, abs=1e-7)


def test_dino_distill_is_cross_entropy_to_the_centred_sharpened_teacher_by_hand():
    s, t, c = torch.tensor([[0.2, 0.0]]), torch.tensor([[0.1, 0.3]]), torch.tensor([[0.1, 0.1]])
    q = torch.softmax(torch.tensor([0.0, 0.2]) / 0.04, -1)
    log_p = torch.log_softmax(torch.tensor([2.0, 0.0]), -1)  # 0.2 / 0.1
    loss, probs = dino_distill(s, t, c, 0.1, 0.04)
    assert loss.item() == pytest.approx(float(-(q * log_p).sum()), rel=1e-6)
    assert torch.allclose(probs[0], q)


def test_sam_embedding_mse_resizes_the_student_map_to_the_embeddings_grid_by_hand():
    tokens = torch.tensor([[[1.0, 2.0]]])  # one token (a 1x1 grid), two channels
    embedding = torch.tensor([[[[1.0, 3.0], [1.0, 1.0]], [[2.0, 2.0], [2.0, 0.0]]]])  # (1, 2, 2, 2)
    # the token spread over the 2x2 grid: channel 0 misses by 2 once, channel 1 by 2 once: (4 + 4) / 8
    assert embedding_mse(tokens, (1, 1), embedding).item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ feature runs


def _held_out_cosine(method: Distill, folder) -> float:
    """Mean cosine of the projected student embedding and the teacher's standardised one on the 32 test
    digits."""
    from PIL import Image

    pre = method.encoder.preprocess
    x = torch.stack(
        [pre.transform()(Image.open(p).convert("RGB")) for p in sorted(folder.rglob("test/*/*.png"))]
    )
    with torch.no_grad():
        s = method.pooled_proj(method.encoder.eval()(x))
        t = method.pooled_norm.eval()(method.frozen_teacher(x).pooled)  # the training run's statistics
        return float(torch.nn.functional.cosine_similarity(s, t, dim=-1).mean())


def test_feature_distillation_moves_the_student_to_the_frozen_teacher_and_exports_it(
    digit_folder, tmp_path, cli, monkeypatch
):
    built = []

    def record(*args):  # the run's method, and its teacher's weights as it starts
        built.append(Distill(*args))
        built.append({k: v.clone() for k, v in built[0].frozen_teacher.state_dict().items()})
        return built[0]

    monkeypatch.setattr(run_module, "Distill", record)
    run = distill(_config(tmp_path / "run", digit_folder, augment=False, lr=3e-3))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [m for m in metrics if "epoch/loss" in m]
    assert epochs[-1]["epoch/loss"] < 0.8 * epochs[0]["epoch/loss"], epochs
    steps = [m["train/teacher_cosine"] for m in metrics if "train/teacher_cosine" in m]
    assert steps[-1] > steps[0] + 0.1, steps  # the projected student embedding, closer to the teacher's

    # the teacher is neither checkpointed nor exported; the export is the student's layout
    for ckpt in checkpoints(run / "checkpoints"):
        keys = set(load_file(ckpt / "model.safetensors"))
        parts = {"encoder", "pooled_proj", "token_proj", "pooled_norm", "token_norm"}
        assert {k.split(".")[0] for k in keys} == parts, keys
    assert create_encoder(str(run)).num_features == create_encoder("cvfm/tiny-resnet").num_features
    reference = tmp_path / "ref"
    create_encoder("cvfm/tiny-resnet").save(reference)
    assert (
        load_file(run / "backbone" / "model.safetensors").keys()
        == load_file(reference / "model.safetensors").keys()
    )
    teacher = built[0].frozen_teacher  # frozen: eval mode, no grad, the weights it started with
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, built[1][k]) for k, v in teacher.state_dict().items())

    held_out = _held_out_cosine(built[0], digit_folder)
    assert held_out > steps[0] + 0.1, (steps[0], held_out)  # on images it never trained on, too

    r = cli("evaluate", "knn", str(run), "--data", digit_folder, "--num-workers", "0", "--k", "3")
    assert 0.25 < one_json_line(r)["metrics"]["knn_top1@3"] <= 1.0


def test_a_wrong_teacher_layer_is_a_usage_error_listing_close_matches(cli, digit_folder, tmp_path):
    args = ["distill", "--teacher", "cvfm/tiny-vit", "--data", digit_folder, "-o", tmp_path / "run"]
    assert_usage_error(cli(*args, "--teacher-layer", "block.1"), "'block.1'", "close matches: blocks.1")
    assert not (tmp_path / "run").exists()


def test_teacher_layer_hooks_an_intermediate_block(digit_folder, tmp_path):
    student = create_encoder("cvfm/tiny-resnet")
    teacher = load_teacher("cvfm/tiny-vit", ("feature",), student.preprocess, "blocks.0")
    x = torch.randn(2, 3, student.preprocess.size, student.preprocess.size)
    out = teacher(x)
    inner = teacher.encoder.model
    with torch.no_grad():
        t = inner.patch_embed(teacher.adapt(x))
        t = inner.norm_pre(inner.patch_drop(inner._pos_embed(t)))
        expected = inner.blocks[0](t)[:, inner.num_prefix_tokens :]
    assert torch.allclose(out.tokens, expected, atol=1e-5) and torch.allclose(
        out.pooled, expected.mean(1), atol=1e-5
    )


# ------------------------------------------------------------------------------ logit and dino runs


def test_logit_distillation_from_a_finetune_run(digit_folder, tmp_path):
    from cvfm.finetune import FinetuneConfig, finetune

    teacher = finetune(
        FinetuneConfig(data=str(digit_folder), output=str(tmp_path / "ft"), freeze=True, num_workers=0)
    )
    run = distill(
        _config(tmp_path / "kd", digit_folder, teacher=str(teacher), losses=("logit",), augment=False)
    )
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [m["epoch/loss_logit"] for m in metrics if "epoch/loss_logit" in m]
    assert len(epochs) == 2 and epochs[1] < epochs[0]
    keys = set(load_file(checkpoints(run / "checkpoints")[-1] / "model.safetensors"))
    assert {k.split(".")[0] for k in keys} == {"encoder", "logit_head"}


def test_logit_distillation_refuses_a_teacher_that_is_not_a_classifier(digit_folder, tmp_path, cli):
    args = ["distill", "--teacher", "cvfm/tiny-vit", "--loss", "logit", "--data", digit_folder]
    assert_usage_error(cli(*args, "-o", tmp_path / "run"), "--loss logit needs a classifier teacher")
    r = cli(
        "distill",
        "--teacher",
        "cvfm/tiny-vit",
        "--loss",
        "dino",
        "--data",
        digit_folder,
        "-o",
        tmp_path / "r",
    )
    assert_usage_error(r, "--loss dino needs the teacher's DINO head")


def test_dino_distillation_from_a_dino_run_exports_the_students_ema(digit_folder, tmp_path):
    from cvfm.pretrain import PretrainConfig, pretrain

    dino = PretrainConfig(data=str(digit_folder), split="train", output=str(tmp_path / "dino"), epochs=1)
    teacher = pretrain(
        replace(dino, batch_size=32, num_workers=0, options={"local_crops": "0", "out_dim": "64"})
    )
    run = distill(_config(tmp_path / "kd", digit_folder, teacher=str(teacher), losses=("dino",)))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["train/loss_dino"]) for m in metrics if "train/loss_dino" in m)
    state = load_file(checkpoints(run / "checkpoints")[-1] / "model.safetensors")
    assert {k.split(".")[0] for k in state} == {"encoder", "student", "dino_head", "center"}
    exported = load_file(run / "backbone" / "model.safetensors")
    ema = {k.removeprefix("encoder.model."): v for k, v in state.items() if k.startswith("encoder.")}
    online = {k.removeprefix("student.model."): v for k, v in state.items() if k.startswith("student.")}
    assert all(torch.equal(exported[k], ema[k]) for k in exported)  # the EMA, not the online student
    assert any(not torch.equal(exported[k], online[k]) for k in exported if exported[k].is_floating_point())


def test_sam_embedding_distillation_of_tiny_sam_into_a_cnn(digit_folder, tmp_path):
    run = distill(_config(tmp_path / "kd", digit_folder, teacher="cvfm/tiny-sam", losses=("sam-embedding",)))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [m["epoch/loss_sam_embedding"] for m in metrics if "epoch/loss_sam_embedding" in m]
    assert len(epochs) == 2 and epochs[1] < 0.95 * epochs[0], epochs
    state = load_file(checkpoints(run / "checkpoints")[-1] / "model.safetensors")
    assert {k.split(".")[0] for k in state} == {"encoder", "token_proj"}  # no SAM weights
    assert state["token_proj.weight"].shape == (32, create_encoder(str(run)).num_features)  # to SAM's width


def test_cache_teacher_computes_each_view_once_and_trains_as_without(
    digit_folder, tmp_path, monkeypatch, cli
):
    built = []
    monkeypatch.setattr(run_module, "Distill", lambda *a: built.append(Distill(*a)) or built[-1])
    cache = tmp_path / "cache"
    cached = distill(_config(tmp_path / "cached", digit_folder, augment=False, cache_teacher=str(cache)))
    assert len(list(cache.glob("*.safetensors"))) == 128 and not list(cache.glob("*.tmp*"))
    assert (built[0].cache.misses, built[0].cache.hits) == (128, 128)  # epoch 1 computes, epoch 2 reads
    plain = distill(_config(tmp_path / "plain", digit_folder, augment=False))
    a, b = (load_file(r / "backbone" / "model.safetensors") for r in (cached, plain))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)
    args = ["distill", "--teacher", "cvfm/tiny-vit", "--data", digit_folder, "--cache-teacher", cache]
    assert_usage_error(cli(*args, "-o", tmp_path / "r"), "--cache-teacher", "--no-augment")
