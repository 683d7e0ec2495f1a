"""Losses, heads, EMA and schedules of the self-supervised methods, checked against hand computations.

The references here are written with plain loops over numpy arrays, never through the code under test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from cvfm.data.views import Preprocess
from cvfm.errors import UsageError
from cvfm.methods import Budget, build_method
from cvfm.methods.base import configure, ema_update
from cvfm.methods.byol import BYOLConfig, byol_loss
from cvfm.methods.dino import DINOConfig, DINOHead, dino_loss
from cvfm.methods.simclr import SimCLRConfig, nt_xent
from cvfm.runtime.schedules import cosine, linear_then_constant

# ---------------------------------------------------------------------------------------------- helpers


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _unit(v: np.ndarray) -> np.ndarray:
    return v / math.sqrt(sum(float(x) ** 2 for x in v))


def _softmax(v: np.ndarray) -> np.ndarray:
    e = [math.exp(float(x) - float(max(v))) for x in v]
    s = sum(e)
    return np.array([x / s for x in e])


def _log_softmax(v: np.ndarray) -> np.ndarray:
    m = float(max(v))
    lse = m + math.log(sum(math.exp(float(x) - m) for x in v))
    return np.array([float(x) - lse for x in v])


def _tiny_encoder():
    from cvfm.registry import create_encoder

    torch.manual_seed(0)
    return create_encoder("cvfm/tiny-resnet", pretrained=False)


# ---------------------------------------------------------------------------------------------- NT-Xent


def _nt_xent_by_hand(z1: np.ndarray, z2: np.ndarray, t: float) -> float:
    n = len(z1)
    z = [_unit(v) for v in list(z1) + list(z2)]
    total = 0.0
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        sims = {j: float(np.dot(z[i], z[j])) for j in range(2 * n)}
        denom = sum(math.exp(sims[j] / t) for j in range(2 * n) if j != i)
        total += -math.log(math.exp(sims[pos] / t) / denom)
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_hand_computation(temperature):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    got = float(nt_xent(z1, z2, temperature))
    assert got == pytest.approx(_nt_xent_by_hand(_np(z1), _np(z2), temperature), abs=1e-5)


def test_nt_xent_is_scale_invariant_in_its_inputs():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    assert float(nt_xent(3 * z1, 0.5 * z2, 0.2)) == pytest.approx(float(nt_xent(z1, z2, 0.2)), abs=1e-5)


def test_nt_xent_identical_orthogonal_views_score_lower_than_random():
    z = torch.eye(8)[:4]  # 4 orthogonal rows
    aligned = float(nt_xent(z, z.clone(), 0.2))
    g = torch.Generator().manual_seed(3)
    random = float(nt_xent(torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g), 0.2))
    assert aligned < random
    # By hand: positive sim 1, the 6 negatives sim 0 (self excluded): -log(e^5 / (e^5 + 6)).
    assert aligned == pytest.approx(-math.log(math.exp(5) / (math.exp(5) + 6)), abs=1e-5)


def test_nt_xent_gradient_flows_to_both_views():
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    # The full gradient of each view, element by element, against finite differences of the loss.
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.2), (z1, z2))


# ---------------------------------------------------------------------------------------------- BYOL


def test_byol_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(5)
    p, z = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    pn, zn = _np(p), _np(z)
    by_hand = sum(2 - 2 * float(np.dot(_unit(pn[i]), _unit(zn[i]))) for i in range(6)) / 6
    assert float(byol_loss(p, z)) == pytest.approx(by_hand, abs=1e-5)


def test_byol_loss_extremes():
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(6))
    assert float(byol_loss(2 * z, z)) == pytest.approx(0.0, abs=1e-6)
    assert float(byol_loss(-z, z)) == pytest.approx(4.0, abs=1e-6)


def test_byol_loss_stops_gradient_into_target():
    g = torch.Generator().manual_seed(7)
    p = torch.randn(4, 8, generator=g, requires_grad=True)
    z = torch.randn(4, 8, generator=g, requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


# ---------------------------------------------------------------------------------------------- DINO


def _dino_loss_by_hand(student, teacher, center, n_crops, ts, tt) -> float:
    batch = teacher.shape[0] // 2
    s_chunks = [student[v * batch : (v + 1) * batch] for v in range(n_crops)]
    t_chunks = [teacher[i * batch : (i + 1) * batch] for i in range(2)]
    pair_losses = []
    for iq in range(2):
        for v in range(n_crops):
            if v == iq:
                continue
            per_sample = []
            for b in range(batch):
                q = _softmax((t_chunks[iq][b] - center[0]) / tt)
                logp = _log_softmax(s_chunks[v][b] / ts)
                per_sample.append(sum(-float(q[k]) * float(logp[k]) for k in range(len(q))))
            pair_losses.append(sum(per_sample) / batch)
    return sum(pair_losses) / len(pair_losses)


def test_dino_loss_matches_hand_computation():
    n_crops, batch, k = 4, 3, 5
    g = torch.Generator().manual_seed(8)
    student = torch.randn(n_crops * batch, k, generator=g)
    teacher = torch.randn(2 * batch, k, generator=g)
    center = torch.randn(1, k, generator=g)
    loss, probs = dino_loss(student, teacher, center, n_crops, 0.1, 0.04)
    expected = _dino_loss_by_hand(_np(student), _np(teacher), _np(center), n_crops, 0.1, 0.04)
    assert float(loss) == pytest.approx(expected, abs=1e-4, rel=1e-5)
    # The returned teacher probabilities are the centred, sharpened softmax.
    tn, cn = _np(teacher), _np(center)
    for row in range(2 * batch):
        np.testing.assert_allclose(_np(probs[row]), _softmax((tn[row] - cn[0]) / 0.04), atol=1e-5)


def test_dino_loss_has_no_gradient_into_teacher():
    g = torch.Generator().manual_seed(9)
    student = torch.randn(4 * 2, 5, generator=g, requires_grad=True)
    teacher = torch.randn(2 * 2, 5, generator=g, requires_grad=True)
    loss, _ = dino_loss(student, teacher, torch.zeros(1, 5), 4, 0.1, 0.04)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_dino_head_batch_norm_option():
    plain = DINOHead(in_dim=16, out_dim=32, hidden_dim=24, bottleneck_dim=8)
    with_bn = DINOHead(in_dim=16, out_dim=32, hidden_dim=24, bottleneck_dim=8, batch_norm=True)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in with_bn.modules()) == 2
    # With BN, a constant shift of the input (the shared component of post-ReLU CNN features) is removed.
    x = torch.randn(6, 16)
    torch.testing.assert_close(with_bn.mlp(x + 5.0), with_bn.mlp(x), atol=1e-4, rtol=1e-4)


def test_dino_head_shapes_weight_norm_and_normalised_bottleneck():
    torch.manual_seed(0)
    head = DINOHead(in_dim=16, out_dim=32, hidden_dim=24, bottleneck_dim=8)
    x = torch.randn(5, 16)
    out = head(x)
    assert out.shape == (5, 32)
    g = head.last_layer.parametrizations.weight.original0
    assert g.requires_grad is False
    assert torch.all(g == 1.0)
    # weight = g * v / ||v|| with g = 1: every output row of the weight has unit norm.
    w = head.last_layer.weight
    np.testing.assert_allclose(w.detach().norm(dim=1).numpy(), np.ones(32), atol=1e-5)
    # The bottleneck is L2-normalised before the last layer, so the output is W @ unit(mlp(x)).
    bottleneck = head.mlp(x).detach().double().numpy()
    wn = w.detach().double().numpy()
    for b in range(5):
        u = _unit(bottleneck[b])
        np.testing.assert_allclose(out[b].detach().double().numpy(), wn @ u, atol=1e-5)
    # Each output is a cosine of two unit vectors.
    assert float(out.detach().abs().max()) <= 1.0 + 1e-5
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert "last_layer.parametrizations.weight.original1" in trainable
    assert "last_layer.parametrizations.weight.original0" not in trainable


def test_dino_norm_last_layer_off_trains_the_weight_norm():
    # main_dino.py's --norm_last_layer false: g starts at 1 but learns, so output rows may leave unit norm.
    dino = _dino({"norm_last_layer": "false"})
    g = dino.head.last_layer.parametrizations.weight.original0
    assert g.requires_grad and torch.all(g == 1.0)
    teacher_g = dino.teacher[1].last_layer.parametrizations.weight.original0
    assert not teacher_g.requires_grad
    views = [torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)] * 2
    loss, _ = dino({"image": views}, step=5)  # past the frozen-last-layer steps
    loss.backward()
    assert g.grad is not None and float(g.grad.abs().sum()) > 0
    assert not _dino().head.last_layer.parametrizations.weight.original0.requires_grad  # default: fixed


def _dino(options: dict | None = None, *, num_images=100, steps_per_epoch=5, total_steps=10, batch_size=4):
    budget = Budget(
        num_images=num_images, steps_per_epoch=steps_per_epoch, total_steps=total_steps, batch_size=batch_size
    )
    opts = {
        "out_dim": "64",
        "hidden_dim": "32",
        "bottleneck_dim": "16",
        "local_crops": "2",
        **(options or {}),
    }
    return build_method("dino", _tiny_encoder(), opts, budget)


def test_dino_update_center_is_an_ema_of_batch_means():
    method = _dino()
    old = torch.randn(1, 64, generator=torch.Generator().manual_seed(10))
    method.center.copy_(old)
    teacher_out = torch.randn(6, 64, generator=torch.Generator().manual_seed(11))
    method.update_center(teacher_out)
    tn = _np(teacher_out)
    batch_mean = np.array([sum(tn[r, c] for r in range(6)) / 6 for c in range(64)])
    np.testing.assert_allclose(_np(method.center[0]), 0.9 * _np(old[0]) + 0.1 * batch_mean, atol=1e-6)


def _fake_encoder(embed_dim: int, size: int, batch_norm: bool = False) -> torch.nn.Module:
    enc = torch.nn.Sequential(torch.nn.BatchNorm2d(3) if batch_norm else torch.nn.Identity())
    enc.num_features, enc.preprocess = embed_dim, Preprocess(size=size)
    return enc


@pytest.mark.parametrize(
    ("num_images", "out_dim", "teacher_temp"),
    [(10_000, 1024, 0.04), (2_000_000, 65536, 0.07), (150_000, 16384, 0.07), (1000, 256, 0.04)],
)
def test_dino_config_resolves_auto_values_from_dataset_size(num_images, out_dim, teacher_temp):
    budget = Budget(num_images=num_images, steps_per_epoch=10, total_steps=100, batch_size=64)
    cfg = DINOConfig().resolve(_fake_encoder(128, 224), budget)
    assert cfg.out_dim == out_dim
    assert cfg.teacher_temp == pytest.approx(teacher_temp)
    assert cfg.hidden_dim == min(2048, 8 * 128)
    assert cfg.local_size == 96


def test_dino_config_keeps_explicit_values():
    budget = Budget(num_images=2_000_000, steps_per_epoch=10, total_steps=100, batch_size=64)
    cfg = DINOConfig(out_dim=300, teacher_temp=0.05, hidden_dim=64, local_size=12)
    cfg.resolve(_fake_encoder(128, 32), budget)
    assert (cfg.out_dim, cfg.teacher_temp, cfg.hidden_dim, cfg.local_size) == (300, 0.05, 64, 12)
    # Small images: local crops are at least 8 px.
    assert DINOConfig().resolve(_fake_encoder(16, 16), budget).local_size == 8


def test_dino_head_batch_norm_auto_follows_the_backbone():
    budget = Budget(num_images=1000, steps_per_epoch=10, total_steps=100, batch_size=64)
    assert DINOConfig().resolve(_fake_encoder(16, 32, batch_norm=True), budget).head_bn is True
    assert DINOConfig().resolve(_fake_encoder(16, 32), budget).head_bn is False
    assert DINOConfig(head_bn=False).resolve(_fake_encoder(16, 32, batch_norm=True), budget).head_bn is False


def _random_views(method, batch=4):
    g = torch.Generator().manual_seed(12)
    size, local = method.encoder.preprocess.size, method.cfg.local_size
    views = [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)]
    views += [torch.randn(batch, 3, local, local, generator=g) for _ in range(method.cfg.local_crops)]
    return views


def test_dino_freezes_last_layer_for_the_configured_steps():
    method = _dino({"freeze_last_layer_epochs": "1"}, steps_per_epoch=5, total_steps=100)
    assert method.freeze_last_layer_steps == 5
    # In a short run the freeze is capped at 10% of it, like the warm-ups.
    assert (
        _dino({"freeze_last_layer_epochs": "1"}, steps_per_epoch=5, total_steps=20).freeze_last_layer_steps
        == 2
    )
    last = method.head.last_layer.parametrizations.weight.original1

    def grads_after_hook(step):
        method.zero_grad(set_to_none=True)
        loss, _ = method({"image": _random_views(method)}, step)
        loss.backward()
        assert last.grad is not None  # gradients exist before the hook
        method.before_optimizer_step(step)
        return last.grad, method.head.mlp[0].weight.grad

    frozen_last, frozen_mlp = grads_after_hook(4)
    assert frozen_last is None
    assert frozen_mlp is not None  # the rest of the head still learns
    trained_last, _ = grads_after_hook(5)
    assert trained_last is not None and trained_last.abs().sum() > 0


def test_dino_forward_returns_finite_loss_and_logs():
    method = _dino()
    views = _random_views(method)
    # By hand, from the networks' outputs at step 0: centre 0, teacher temperature 0.04, student 0.1.
    with torch.no_grad():
        teacher = _np(method.teacher(torch.cat(views[:2])))
        h = torch.cat([method.encoder(torch.cat(views[:2])), method.encoder(torch.cat(views[2:]))])
        student = _np(method.head(h))  # one head batch: its BatchNorm sees global and local crops
    probs = [_softmax(row / 0.04) for row in teacher]
    entropy = sum(-sum(float(p) * math.log(max(float(p), 1e-12)) for p in row) for row in probs) / len(probs)
    loss, logs = method({"image": views}, 0)
    by_hand = _dino_loss_by_hand(student, teacher, np.zeros((1, 64)), 4, 0.1, 0.04)
    assert float(loss.detach()) == pytest.approx(by_hand, rel=1e-4)
    assert logs["teacher_temp"] == pytest.approx(0.04)
    assert logs["momentum"] == pytest.approx(0.996)
    assert logs["teacher_entropy_max"] == pytest.approx(math.log(64))
    assert logs["teacher_entropy"] == pytest.approx(entropy, rel=1e-4)


# ---------------------------------------------------------------------------------------------- EMA


def test_ema_update_matches_hand_computation():
    torch.manual_seed(0)
    target, online = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [_np(p).copy() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for t, o, b in zip(target.parameters(), online.parameters(), before, strict=True):
        ob = _np(o)
        expected = np.array([0.9 * x + 0.1 * y for x, y in zip(b.ravel(), ob.ravel(), strict=True)])
        np.testing.assert_allclose(_np(t).ravel(), expected, atol=1e-6)
        assert t.grad is None
    # The online module is untouched.
    assert not torch.equal(target.weight, online.weight)


def test_ema_update_momentum_one_keeps_target_and_zero_copies_online():
    torch.manual_seed(0)
    target, online = nn.Linear(3, 2), nn.Linear(3, 2)
    w = target.weight.detach().clone()
    ema_update(target, online, 1.0)
    assert torch.equal(target.weight, w)
    ema_update(target, online, 0.0)
    assert torch.allclose(target.weight, online.weight)


@pytest.mark.parametrize(
    ("name", "option", "start"), [("byol", "momentum", 0.99), ("dino", "momentum_teacher", 0.996)]
)
def test_momentum_schedules_start_at_configured_value_and_end_at_one(name, option, start):
    budget = Budget(num_images=100, steps_per_epoch=25, total_steps=100, batch_size=4)
    opts = {option: str(start)}
    if name == "dino":
        opts.update(out_dim="64", hidden_dim="32", bottleneck_dim="16")
    method = build_method(name, _tiny_encoder(), opts, budget)
    m = np.asarray(method.momentum)
    assert len(m) == 100
    assert m[0] == pytest.approx(start)
    assert m[-1] == pytest.approx(1.0, abs=1e-12)
    assert np.all(np.diff(m) >= -1e-12)  # non-decreasing
    assert np.all(m <= 1.0)


def test_byol_after_optimizer_step_moves_target_towards_online():
    budget = Budget(num_images=100, steps_per_epoch=5, total_steps=10, batch_size=4)
    method = build_method("byol", _tiny_encoder(), {"proj_hidden": "16", "proj_dim": "8"}, budget)
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(1.0)
    online = [_np(p).copy() for p in nn.Sequential(method.encoder, method.projector).parameters()]
    target_before = [_np(p).copy() for p in method.target.parameters()]
    method.after_optimizer_step(0)
    m = float(method.momentum[0])
    for t, o, b in zip(method.target.parameters(), online, target_before, strict=True):
        np.testing.assert_allclose(_np(t), m * b + (1 - m) * o, atol=1e-6)


# ---------------------------------------------------------------------------------------------- schedules


def test_cosine_warmup_then_decay_to_end():
    s = cosine(1.0, 0.1, total_steps=110, warmup_steps=10, warmup_from=0.2)
    assert len(s) == 110
    assert s[0] == pytest.approx(0.2)
    np.testing.assert_allclose(s[:10], [0.2 + 0.08 * i for i in range(10)], atol=1e-12)
    assert np.all(np.diff(s[:11]) > 0)  # warm-up rises to the peak
    assert s[10] == pytest.approx(1.0)
    assert s.max() == pytest.approx(1.0)
    assert np.all(np.diff(s[10:]) <= 0)  # then decays monotonically
    # The cosine is point-symmetric about the midpoint of the decay, and ends exactly at `end`.
    np.testing.assert_allclose(s[10:] + s[10:][::-1], 1.1, atol=1e-12)
    assert s[-1] == pytest.approx(0.1, abs=1e-12)
    assert s.min() >= 0.1 - 1e-12


def test_cosine_without_warmup_and_degenerate_lengths():
    s = cosine(0.5, 0.5, total_steps=7)
    np.testing.assert_allclose(s, np.full(7, 0.5))
    assert len(cosine(1.0, 0.0, total_steps=0)) == 1
    # A warm-up longer than the run is capped at the run.
    assert len(cosine(1.0, 0.0, total_steps=5, warmup_steps=50)) == 5


def test_linear_then_constant():
    s = linear_then_constant(0.04, 0.07, ramp_steps=3, total_steps=6)
    np.testing.assert_allclose(s, [0.04, 0.05, 0.06, 0.07, 0.07, 0.07], atol=1e-12)
    np.testing.assert_allclose(linear_then_constant(0.04, 0.07, 0, 4), [0.07] * 4)
    # A ramp longer than the run is squeezed into the run.
    capped = linear_then_constant(0.0, 1.0, ramp_steps=10, total_steps=4)
    np.testing.assert_allclose(capped, [0.0, 0.25, 0.5, 0.75], atol=1e-12)


def test_dino_teacher_temperature_warms_up_then_stays():
    method = _dino(
        {"warmup_teacher_temp_epochs": "1", "teacher_temp": "0.07"}, steps_per_epoch=2, total_steps=10
    )
    temps = np.asarray(method.teacher_temps)
    assert method.resolved["warmup_teacher_temp_steps"] == 2
    np.testing.assert_allclose(temps, [0.04, 0.055] + [0.07] * 8, atol=1e-9)


# ---------------------------------------------------------------------------------------------- configure


@dataclass
class _Cfg:
    rate: float = 0.1
    count: int = 3
    flag: bool = True
    pair: tuple = (0.1, 0.2)
    auto: int | None = None
    auto_float: float | None = None
    epochs: float = 1


def test_configure_parses_each_type():
    cfg = configure(
        _Cfg,
        {
            "rate": "0.5",
            "count": "7",
            "flag": "no",
            "pair": "0.3,0.9",
            "auto": "12",
            "auto_float": "0.07",
            "epochs": "0.5",
        },
    )
    assert cfg == _Cfg(0.5, 7, False, (0.3, 0.9), 12, 0.07, 0.5)
    assert isinstance(cfg.count, int) and isinstance(cfg.auto_float, float)
    assert configure(_Cfg, {"auto": "auto", "auto_float": "none"}) == _Cfg()
    assert configure(_Cfg, {}) == _Cfg()


def test_configure_unknown_key_names_the_allowed_ones():
    with pytest.raises(UsageError) as e:
        configure(SimCLRConfig, {"nope": "1"})
    msg = str(e.value)
    assert "nope" in msg
    for key in ("temperature", "proj_dim", "proj_hidden", "min_scale"):
        assert key in msg


@pytest.mark.parametrize(
    ("cls", "key", "raw"),
    [
        (SimCLRConfig, "temperature", "abc"),
        (SimCLRConfig, "proj_dim", "1.5"),
        (BYOLConfig, "proj_hidden", "big"),
        (DINOConfig, "centering", "maybe"),
        (DINOConfig, "global_scale", "a,b"),
        (DINOConfig, "global_scale", "0.4"),
        (DINOConfig, "local_scale", "0.1,0.2,0.3"),
        (DINOConfig, "teacher_temp", "hot"),
    ],
)
def test_configure_bad_value_is_a_usage_error(cls, key, raw):
    with pytest.raises(UsageError, match=key):
        configure(cls, {key: raw})


def test_dino_float_options_accept_fractions():
    # teacher_temp is `float | None` and the epoch counts are floats with integer defaults.
    cfg = configure(
        DINOConfig,
        {
            "teacher_temp": "0.07",
            "warmup_teacher_temp_epochs": "0.5",
            "freeze_last_layer_epochs": "0.5",
            "out_dim": "auto",
        },
    )
    assert cfg.teacher_temp == pytest.approx(0.07)
    assert cfg.warmup_teacher_temp_epochs == pytest.approx(0.5)
    assert cfg.freeze_last_layer_epochs == pytest.approx(0.5)
    assert cfg.out_dim is None


def test_build_method_rejects_unknown_method():
    budget = Budget(num_images=10, steps_per_epoch=1, total_steps=1, batch_size=2)
    with pytest.raises(UsageError, match="simclr"):
        build_method("mocov3", _tiny_encoder(), {}, budget)
