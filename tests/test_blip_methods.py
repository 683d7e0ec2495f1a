"""BLIP fine-tuning (`--method blip-captioner`, `--method blip-filter`): the ITC loss against a hand
computation, hard-negative mining, the ITM targets, training on image-text pairs through the shared loop,
the saved Captioner / Matcher loading back through the registry, exact resume and the refusals."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from conftest import TOY_COLOURS, write_colour_pairs
from PIL import Image
from safetensors.torch import load_file

from cvfm.errors import UsageError
from cvfm.methods import Budget, build_method, method_class
from cvfm.methods.blip import TEMP_MAX, TEMP_MIN, itc_loss, itm_loss, mine_hard_negatives, text_ids
from cvfm.pretrain import PretrainConfig, pretrain
from cvfm.registry import create_captioner, create_matcher
from cvfm.runtime.checkpoint import latest_checkpoint

# ---------------------------------------------------------------------------------------------- ITC


def _itc_by_hand(img, txt, temp: float, texts: list[str] | None = None) -> float:
    """Mean of the two cross-entropies with explicit loops; pairs with equal texts share the target."""
    n = len(img)
    a = [v / math.sqrt(sum(float(x) ** 2 for x in v)) for v in img]
    b = [v / math.sqrt(sum(float(x) ** 2 for x in v)) for v in txt]
    sim = [[sum(float(x) * float(y) for x, y in zip(a[i], b[j], strict=True)) / temp for j in range(n)]
           for i in range(n)]  # fmt: skip
    positives = [[j for j in range(n) if (texts[i] == texts[j] if texts else i == j)] for i in range(n)]
    i2t = t2i = 0.0
    for i in range(n):
        row = math.log(sum(math.exp(sim[i][j]) for j in range(n)))
        col = math.log(sum(math.exp(sim[j][i]) for j in range(n)))
        i2t += sum(-(sim[i][j] - row) for j in positives[i]) / len(positives[i])
        t2i += sum(-(sim[j][i] - col) for j in positives[i]) / len(positives[i])
    return (i2t / n + t2i / n) / 2


@pytest.mark.parametrize("temp", [TEMP_MIN * 50, 0.07, TEMP_MAX])
def test_itc_loss_matches_hand_computation(temp):
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 8, generator=g), 3 * torch.randn(5, 8, generator=g)
    got = float(itc_loss(img, txt, torch.tensor(temp)))
    assert got == pytest.approx(_itc_by_hand(img.double().numpy(), txt.double().numpy(), temp), rel=1e-5)
    texts = ["a", "b", "c", "d", "e"]  # all different: the ids change nothing
    assert float(itc_loss(img, txt, torch.tensor(temp), text_ids(texts))) == pytest.approx(got, rel=1e-6)


def test_itc_loss_spreads_the_target_over_identical_captions():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    texts = ["a red cat", "a blue dog", "a red cat", "a cow", "a blue dog", "a red cat"]
    got = float(itc_loss(img, txt, torch.tensor(0.1), text_ids(texts)))
    expected = _itc_by_hand(img.double().numpy(), txt.double().numpy(), 0.1, texts)
    assert got == pytest.approx(expected, rel=1e-5)
    assert got != pytest.approx(float(itc_loss(img, txt, torch.tensor(0.1))), rel=1e-3)


def test_itc_loss_gradient_reaches_features_and_temperature():
    g = torch.Generator().manual_seed(2)
    img = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    # Every gradient entry (features and temperature) against finite differences of the loss.
    assert torch.autograd.gradcheck(itc_loss, (img, txt, temp))


# ---------------------------------------------------------------------------------------------- mining / ITM


def test_hard_negative_mining_picks_the_dominant_negative_and_never_a_positive():
    n = 5
    sim = torch.zeros(n, n)
    sim.fill_diagonal_(50.0)  # the positive is the most similar: it must still never be drawn
    hard_text = {0: 3, 1: 4, 2: 0, 3: 1, 4: 2}  # image i's hardest negative text
    for i, j in hard_text.items():
        sim[i, j] = 20.0  # e^20 against e^0: the others get a ~1e-8 share
    same = torch.eye(n, dtype=torch.bool)
    torch.manual_seed(0)
    for _ in range(20):
        neg_text, neg_image = mine_hard_negatives(sim, same)
        assert neg_text.tolist() == [hard_text[i] for i in range(n)]
        # text j's hardest negative image is the image whose hard negative it is (column of sim)
        assert neg_image.tolist() == [next(i for i, t in hard_text.items() if t == j) for j in range(n)]


def test_mining_samples_by_similarity_and_skips_identical_captions():
    sim = torch.tensor([[9.0, 9.0, math.log(3.0), 0.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True  # pair 1 has the same caption as pair 0: not a negative of it
    torch.manual_seed(0)
    draws = torch.stack([mine_hard_negatives(sim, same)[0][0] for _ in range(1000)])
    assert not (draws == 0).any() and not (draws == 1).any()
    # softmax over the candidates {2: 3, 3: 1} -> text 2 three times as often as text 3 (sd 0.014)
    assert float((draws == 2).float().mean()) == pytest.approx(0.75, abs=0.05)
    # a batch of one caption: no true negative exists; any other row is drawn, never the row itself
    neg_text, neg_image = mine_hard_negatives(torch.randn(3, 3), torch.ones(3, 3, dtype=torch.bool))
    assert all(int(neg_text[i]) != i and int(neg_image[i]) != i for i in range(3))


def test_itm_loss_labels_positives_then_negatives_and_counts_accuracy():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.5, 0.0], [0.0, 0.0]])
    loss, accuracy = itm_loss(logits, num_pos=2)
    labels = [1, 1, 0, 0, 0, 0]
    by_hand = -sum(
        row[y] - math.log(sum(math.exp(v) for v in row))
        for row, y in zip(logits.tolist(), labels, strict=True)
    ) / len(labels)
    assert float(loss) == pytest.approx(by_hand, rel=1e-6)
    # argmax: 1, 0, 0, 1, 0, 0 (a tie goes to column 0) -> right on rows 0, 2, 4, 5
    assert accuracy == pytest.approx(4 / 6)


def _filter(**options):
    return build_method("blip-filter", create_matcher("cvfm/tiny-blip"), options, Budget(8, 1, 1, 8))


def test_filter_forward_logs_and_temperature_clamp_and_no_decay_on_it():
    torch.manual_seed(0)
    method = _filter()
    assert method_class("blip-filter").model_kind == "matcher" and method.needs_text()
    assert float(method.temp.detach()) == pytest.approx(0.07)
    x = torch.randn(4, 3, 32, 32)
    loss, logs = method({"image": [x], "text": ["a red cat", "a blue dog", "a red cat", "a cow in green"]}, 0)
    assert {"itc_loss", "itm_loss", "itm_accuracy", "temp"} <= logs.keys()
    assert float(loss.detach()) == pytest.approx(logs["itc_loss"] + logs["itm_loss"], rel=1e-5)
    loss.backward()
    assert method.temp.grad is not None
    assert method.encoder.model.itm_head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        method.temp.fill_(5.0)
    method.after_optimizer_step(0)
    assert float(method.temp.detach()) == pytest.approx(TEMP_MAX)
    no_decay = method.param_groups()[1]["params"]
    assert any(p is method.temp for p in no_decay)
    with pytest.raises(ValueError, match="captions"):
        method({"image": [x]}, 0)
    with pytest.raises(UsageError, match="temp"):
        _filter(temp="0.9")


def test_captioner_sets_label_smoothing_and_masks_the_prompt():
    torch.manual_seed(0)
    captioner = create_captioner("cvfm/tiny-blip")
    x = torch.randn(2, 3, 32, 32)
    texts = ["a red cat", "a blue dog"]
    plain = float(captioner.loss(x, texts, prompt="a picture of ").detach())
    method = build_method("blip-captioner", captioner, {}, Budget(8, 1, 1, 8))
    assert captioner.model.config.text_config.label_smoothing == 0.1
    assert captioner.model.text_decoder.label_smoothing == 0.1  # the loaded loss is BLIP's too
    loss, logs = method({"image": [x], "text": texts}, 0)
    loss = loss.detach()
    # by hand: the same logits, smoothed cross-entropy over the caption tokens (not the prompt's)
    full = [f"a picture of  {t}" for t in texts]
    enc = captioner.tokenizer(full, padding="longest", return_tensors="pt")
    ids = enc["input_ids"].clone()
    ids[:, 0] = captioner.model.config.text_config.bos_token_id
    with torch.no_grad():
        logits = captioner.model(pixel_values=x, input_ids=ids, attention_mask=enc["attention_mask"]).logits
    n_prompt = len(captioner.tokenizer("a picture of", add_special_tokens=False)["input_ids"]) + 1
    targets = ids.masked_fill(enc["attention_mask"] == 0, -100)
    targets[:, :n_prompt] = -100
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    terms = []
    for b in range(2):
        for t in range(ids.shape[1] - 1):
            y = int(targets[b, t + 1])
            if y != -100:
                terms.append(-(0.9 * logp[b, t, y] + 0.1 * logp[b, t].mean()))
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-4)
    assert float(loss) != pytest.approx(plain, rel=1e-3)  # label smoothing is on
    assert logs["lm_loss"] == pytest.approx(float(loss))


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture
def toy_pairs(tmp_path):
    return write_colour_pairs(tmp_path / "pairs", size=32)


def _config(out, data, method, **kw) -> PretrainConfig:
    base = dict(data=str(data), method=method, epochs=2, batch_size=16, num_workers=0, checkpoint_every=4)
    return PretrainConfig(**{**base, "output": str(out), **kw})


def _pixels(face, data) -> torch.Tensor:
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    transform = face.preprocess.transform()
    return torch.stack([transform(Image.open(data.parent / r["image"]).convert("RGB")) for r in lines])


def _epoch_losses(run, key="epoch/loss") -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r]


@pytest.mark.slow
def test_blip_filter_trains_on_jsonl_pairs_and_saves_a_matcher(tmp_path, toy_pairs):
    run = pretrain(_config(tmp_path / "run", toy_pairs, "blip-filter", epochs=12, lr=2e-3))
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["model"] == "cvfm/tiny-blip" and info["config"]["text_column"] == "text"
    assert info["status"] == "finished" and info["step"] == 36
    losses = _epoch_losses(run)
    assert losses[-1] < 0.8 * losses[0]
    keys = {k for line in (run / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    assert {"epoch/itc_loss", "epoch/itm_loss", "epoch/itm_accuracy", "epoch/temp"} <= keys

    matcher = create_matcher(str(run)).eval()
    # backbone/ holds the checkpoint's weights (the method's temperature aside: the Matcher has none)
    state = load_file(latest_checkpoint(run / "checkpoints") / "model.safetensors")
    assert "temp" in state
    torch.manual_seed(1)
    fresh = create_matcher("cvfm/tiny-blip")
    fresh.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items() if k != "temp"})
    fresh.eval()
    x = _pixels(matcher, toy_pairs)[::6]
    texts = ["a red square", "a blue square", "a green square", "a yellow square"] * 2
    with torch.no_grad():
        torch.testing.assert_close(matcher.itm_probs(x, texts), fresh.itm_probs(x, texts))
        torch.testing.assert_close(matcher.itc_embeddings(x, texts)[1], fresh.itc_embeddings(x, texts)[1])
    assert matcher.preprocess == fresh.preprocess

    # ITC ranking learnt the colours: each image's best caption of the four is its own
    x, names = _pixels(matcher, toy_pairs), list(TOY_COLOURS)
    captions = [f"a {name} square" for name in names]
    with torch.no_grad():
        img, txt = matcher.itc_embeddings(x, captions)
    labels = np.repeat(np.arange(4), 12)
    assert float(((img @ txt.T).argmax(1).numpy() == labels).mean()) >= 0.9  # 1.0 here; 0.29 untrained


@pytest.mark.slow
def test_itm_learns_to_reject_the_mined_wrong_colour_captions(toy_pairs):
    """ITM leaves its majority-class plateau (accuracy 2/3: always "no match") after ~100 steps from random
    init; here 250 steps at a constant lr, then the head accepts the true pairs and ranks each image's
    own caption above the other colours'."""
    torch.manual_seed(0)
    method = _filter()
    lines = [json.loads(line) for line in toy_pairs.read_text().splitlines()]
    x, texts = _pixels(method.encoder, toy_pairs), [r["text"] for r in lines]
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3, weight_decay=0.05)
    for step in range(250):
        idx = torch.randperm(len(texts))[:16]
        loss, logs = method({"image": [x[idx]], "text": [texts[i] for i in idx]}, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(step)
    assert logs["itm_accuracy"] >= 0.9
    matcher = method.encoder.eval()
    captions = [f"a {name} square" for name in TOY_COLOURS]
    labels = np.repeat(np.arange(4), 12)
    with torch.no_grad():
        probs = torch.stack([matcher.itm_probs(x, [c] * len(x)) for c in captions], dim=1).numpy()
    own = np.eye(4, dtype=bool)[labels]
    # Untrained, the head accepts every pair (positives 1.0, negatives rejected 0.0, argmax 0.25).
    assert (probs[own] > 0.5).mean() >= 0.9  # 1.0 here: positives accepted
    assert (probs[~own] < 0.5).mean() >= 0.8  # 0.92 here: the other colours' captions rejected
    assert (probs.argmax(1) == labels).mean() >= 0.75  # 0.85 here; chance 0.25


def test_blip_captioner_trains_and_saves_a_captioner(tmp_path, toy_pairs):
    run = pretrain(_config(tmp_path / "run", toy_pairs, "blip-captioner", epochs=6, lr=2e-3))
    info = json.loads((run / "run.json").read_text())
    assert info["method_config"]["prompt"] == "a picture of " and info["config"]["model"] == "cvfm/tiny-blip"
    losses = _epoch_losses(run)
    assert losses[-1] < 0.6 * losses[0]

    captioner = create_captioner(str(run)).eval()
    assert captioner.model.config.text_config.label_smoothing == 0.1
    assert captioner.model.text_decoder.label_smoothing == 0.1  # the loaded loss is BLIP's too
    state = load_file(latest_checkpoint(run / "checkpoints") / "model.safetensors")
    torch.manual_seed(1)
    fresh = create_captioner("cvfm/tiny-blip")
    fresh.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()}, strict=True)
    fresh.model.text_decoder.label_smoothing = 0.1
    fresh.eval()
    x = _pixels(captioner, toy_pairs)[::12]
    with torch.no_grad():
        a = captioner.generate(x, prompt="a picture of ", max_length=12, min_length=2)
        b = fresh.generate(x, prompt="a picture of ", max_length=12, min_length=2)
        assert a == b
        assert float(captioner.loss(x, ["a red square"] * 4)) == pytest.approx(
            float(fresh.loss(x, ["a red square"] * 4)), rel=1e-6
        )


def _stop_at(step_to_stop: int):
    def on_step(step: int) -> None:
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)

    return on_step


def test_interrupted_blip_filter_run_resumes_to_identical_weights(tmp_path, toy_pairs):
    full = pretrain(_config(tmp_path / "full", toy_pairs, "blip-filter", epochs=2))
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        pretrain(_config(part, toy_pairs, "blip-filter", epochs=2), on_step=_stop_at(4))
    assert latest_checkpoint(part / "checkpoints").name == "step-00000004"
    pretrain(_config(part, toy_pairs, "blip-filter", resume=True))
    a = load_file(latest_checkpoint(full / "checkpoints") / "model.safetensors")
    b = load_file(latest_checkpoint(part / "checkpoints") / "model.safetensors")
    assert a.keys() == b.keys() and "temp" in a
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    a, b = (
        load_file(full / "backbone" / "model.safetensors"),
        load_file(part / "backbone" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("case", "method", "needle"),
    [
        ("image-only-model", "blip-filter", "fine-tunes a BLIP matcher"),
        ("image-only-model", "blip-captioner", "fine-tunes a BLIP captioner"),
        ("dual-model", "blip-filter", "fine-tunes a BLIP matcher"),
        ("no-texts", "blip-captioner", "has no text in 'text'"),
        ("builtin-without-captions", "blip-filter", "builtin:digits-captions"),
        ("text-model", "blip-filter", "--text-model"),
        ("monitor", "blip-captioner", "--monitor"),
    ],
)
def test_blip_refusals_are_usage_errors_before_anything_is_written(tmp_path, toy_pairs, case, method, needle):
    kw: dict = {}
    data = str(toy_pairs)
    if case == "image-only-model":
        kw = {"model": "cvfm/tiny-resnet"}
    elif case == "dual-model":
        kw = {"model": "cvfm/tiny-clip"}
    elif case == "no-texts":
        img = str(toy_pairs.parent / "red0.png")
        data = str(tmp_path / "m.jsonl")
        (tmp_path / "m.jsonl").write_text("".join(json.dumps({"image": img}) + "\n" for _ in range(20)))
    elif case == "builtin-without-captions":
        data = "builtin:digits"
    elif case == "text-model":
        kw = {"model": "cvfm/tiny-blip", "text_model": "cvfm/tiny-clip"}
    else:
        kw = {"monitor": "builtin:digits"}
    out = tmp_path / "run"
    with pytest.raises(UsageError, match=needle):
        pretrain(_config(out, data, method, **kw))
    assert not (out / "run.json").exists()
