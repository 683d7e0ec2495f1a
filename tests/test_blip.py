"""BLIP captioner and matcher: parity with calling transformers' models directly (same pixels, same
generation settings, same seed), save / load through the registry (cvfm/tiny-blip, transformers folders), and
errors. Preprocessing against BlipImageProcessor: test_preprocess_parity.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from clitools import assert_usage_error
from safetensors.torch import load_file, save_file
from transformers import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    BlipProcessor,
)

from cvfm.errors import CvfmError, UsageError
from cvfm.models.blip import Captioner, Matcher
from cvfm.models.tiny_blip import build_tiny_blip, build_tokenizer
from cvfm.registry import create_captioner, create_matcher
from cvfm.registry.presets import SMALL_PREPROCESS

GEN = {"max_length": 12, "min_length": 3}
TEXTS = ["a photo of a red cat", "the digit seven written in blue"]


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return Captioner(
        build_tiny_blip(BlipForConditionalGeneration).eval(), build_tokenizer(), "t", SMALL_PREPROCESS
    )


@pytest.fixture(scope="module")
def matcher() -> Matcher:
    return Matcher(
        build_tiny_blip(BlipForImageTextRetrieval).eval(), build_tokenizer(), "t", SMALL_PREPROCESS
    )


def _direct(c: Captioner, x: torch.Tensor, n: int, prompt: str | None = None, **kwargs) -> list[list[str]]:
    """transformers' own generate + decode, prompt tokenized as BlipProcessor does."""
    inputs = {}
    if prompt:
        processor = BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=c.tokenizer)
        enc = processor(text=[prompt] * x.shape[0], return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        ids = c.model.generate(pixel_values=x, num_return_sequences=n, **inputs, **kwargs)
    texts = c.tokenizer.batch_decode(ids, skip_special_tokens=True)
    if prompt:
        assert all(t.startswith(prompt) for t in texts), texts
        texts = [t[len(prompt) :] for t in texts]
    texts = [t.strip() for t in texts]
    return [texts[i * n : (i + 1) * n] for i in range(x.shape[0])]


# ------------------------------------------------------------------------------------------ captioner


@pytest.mark.parametrize("prompt", [None, "a picture of"])
def test_beam_search_equals_direct_generate(captioner, x, prompt):
    ours = captioner.generate(x, prompt=prompt, num_beams=3, num_captions=2, **GEN)
    assert ours == _direct(captioner, x, 2, prompt, num_beams=3, repetition_penalty=1.0, **GEN)
    assert all(len(caps) == 2 and caps[0] != caps[1] for caps in ours)


@pytest.mark.parametrize("prompt", [None, "a picture of"])
def test_sampling_equals_direct_generate_with_the_same_seed(captioner, x, prompt):
    torch.manual_seed(7)
    ours = captioner.generate(x, prompt=prompt, top_p=0.9, num_captions=3, **GEN)
    torch.manual_seed(7)
    direct = _direct(captioner, x, 3, prompt, do_sample=True, top_p=0.9, num_beams=1, **GEN)
    assert ours == direct
    assert len({c for caps in ours for c in caps}) == 6  # six distinct samples
    torch.manual_seed(8)
    assert captioner.generate(x, prompt=prompt, top_p=0.9, num_captions=3, **GEN) != ours


def test_several_captions_belong_to_their_own_image(captioner, x):
    """num_return_sequences > 1 expands each image's embeddings in place (image i -> rows i*n..i*n+n-1):
    a batch gives each image the captions it gets alone."""
    batched = captioner.generate(x, num_beams=4, num_captions=3, **GEN)
    alone = [captioner.generate(x[i : i + 1], num_beams=4, num_captions=3, **GEN)[0] for i in range(2)]
    assert batched == alone
    assert batched[0] != batched[1]  # the captions depend on the image (else this test proves nothing)
    # sampling expands by num_return_sequences: with a vanishing top-p every sample is the greedy caption
    # of its own image
    greedy = captioner.generate(x, num_beams=1, **GEN)
    torch.manual_seed(0)
    nearly_greedy = captioner.generate(x, top_p=1e-9, num_captions=3, **GEN)
    assert nearly_greedy == [caps * 3 for caps in greedy]
    assert greedy[0] != greedy[1]


def test_tiny_blip_is_the_same_model_in_every_call():
    a = build_tiny_blip(BlipForConditionalGeneration)
    torch.manual_seed(123)  # the global RNG neither matters nor is consumed
    state = torch.random.get_rng_state()
    b = build_tiny_blip(BlipForConditionalGeneration)
    assert torch.equal(state, torch.random.get_rng_state())
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    # the image tower is alive (BlipVisionConfig's default init of 1e-10 would make it output ~0)
    assert float(a.vision_model.embeddings.patch_embedding.weight.detach().std()) > 1e-3


def test_registry_tiny_blip_captions_and_matches(x):
    c = create_captioner("cvfm/tiny-blip").eval()
    caps = c.generate(x, num_beams=2, **GEN)
    assert len(caps) == 2 and all(len(cs) == 1 and isinstance(cs[0], str) for cs in caps)
    assert caps == _direct(c, x, 1, num_beams=2, **GEN)  # transformers' own generate and decode
    m = create_matcher("cvfm/tiny-blip").eval()
    enc = m.tokenizer(TEXTS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        itm = m.model(pixel_values=x, **enc, use_itm_head=True).itm_score  # the model's ITM head directly
    p = m.itm_probs(x, TEXTS)
    assert p.shape == (2,)
    torch.testing.assert_close(p, F.softmax(itm, dim=-1)[:, 1], rtol=0, atol=1e-6)


def test_loss_is_the_models_lm_loss(captioner, x):
    texts = ["a red cat", "seven"]
    loss = captioner.loss(x, texts)
    enc = captioner.tokenizer(texts, padding="longest", return_tensors="pt")
    ids = enc["input_ids"].clone()
    ids[:, 0] = captioner.model.config.text_config.bos_token_id
    labels = ids.masked_fill(enc["attention_mask"] == 0, -100)
    ref = captioner.model(
        pixel_values=x, input_ids=ids, attention_mask=enc["attention_mask"], labels=labels
    ).loss
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-6


# ------------------------------------------------------------------------------------------ matcher


def test_itm_probs_equal_the_models_itm_head(matcher, x):
    enc = matcher.tokenizer(TEXTS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        out = matcher.model(
            pixel_values=x,
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            use_itm_head=True,
        )
    ref = F.softmax(out.itm_score, dim=-1)[:, 1]
    ours = matcher.itm_probs(x, TEXTS)
    assert float((ours - ref).abs().max()) <= 1e-6
    assert float((ours[0] - ours[1]).abs()) > 1e-6  # pairs differ


def test_itc_embeddings_equal_the_models_similarity(matcher, x):
    enc = matcher.tokenizer(TEXTS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        sim = matcher.model(
            pixel_values=x,
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            use_itm_head=False,
        ).itm_score
        img, txt = matcher.itc_embeddings(x, TEXTS)
    assert sim.shape == (2, 2)
    assert float((img @ txt.T - sim).abs().max()) <= 1e-6
    assert torch.allclose(img.norm(dim=-1), torch.ones(2)) and torch.allclose(txt.norm(dim=-1), torch.ones(2))


# ------------------------------------------------------------------------------ transformers folders


def _processor(size: int = 32) -> BlipImageProcessor:
    return BlipImageProcessor(
        size={"height": size, "width": size}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3]
    )


def _hf_folder(tmp_path, model, name: str):
    folder = tmp_path / name
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    _processor().save_pretrained(folder)
    return folder


def test_captioner_folder_loads_identically(tmp_path, captioner, x):
    folder = _hf_folder(tmp_path, captioner.model, "cap")
    loaded = create_captioner(str(folder)).eval()
    assert isinstance(loaded, Captioner)
    assert loaded.preprocess.mean == (0.4, 0.5, 0.6) and loaded.preprocess.size == 32
    for kwargs in ({"num_beams": 3, "num_captions": 2}, {"prompt": "a picture of", "num_beams": 2}):
        assert loaded.generate(x, **kwargs, **GEN) == captioner.generate(x, **kwargs, **GEN)
    torch.manual_seed(3)
    a = loaded.generate(x, top_p=0.9, num_captions=2, **GEN)
    torch.manual_seed(3)
    assert a == captioner.generate(x, top_p=0.9, num_captions=2, **GEN)
    # cvfm's save() round-trips too (its own preprocess.json wins over the image processor)
    again = create_captioner(str(loaded.save(tmp_path / "saved"))).eval()
    assert again.generate(x, **GEN) == captioner.generate(x, **GEN)


def test_matcher_folder_loads_identically(tmp_path, matcher, x):
    folder = _hf_folder(tmp_path, matcher.model, "itm")
    loaded = create_matcher(str(folder)).eval()
    assert isinstance(loaded, Matcher)
    assert torch.equal(loaded.itm_probs(x, TEXTS), matcher.itm_probs(x, TEXTS))
    with torch.no_grad():
        for a, b in zip(loaded.itc_embeddings(x, TEXTS), matcher.itc_embeddings(x, TEXTS), strict=True):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ errors


def test_a_folder_of_the_other_blip_class_is_a_usage_error(tmp_path, matcher, captioner):
    itm = _hf_folder(tmp_path, matcher.model, "itm")
    with pytest.raises(UsageError, match="BlipForImageTextRetrieval, not a BlipForConditionalGeneration"):
        create_captioner(str(itm))
    cap = _hf_folder(tmp_path, captioner.model, "cap")
    with pytest.raises(UsageError, match="not a BlipForImageTextRetrieval"):
        create_matcher(str(cap))


def test_uncached_hub_model_is_a_one_line_usage_error(empty_hf_cache):
    with pytest.raises(UsageError) as e:
        create_captioner("hf/Salesforce/blip-image-captioning-base")
    assert "not in the local Hugging Face cache" in str(e.value) and "\n" not in str(e.value)


def test_weights_that_do_not_match_are_a_runtime_error(tmp_path, captioner):
    folder = _hf_folder(tmp_path, captioner.model, "cap")
    weights = load_file(folder / "model.safetensors")
    dropped = next(k for k in weights if "text_decoder" in k and k.endswith("query.weight"))
    del weights[dropped]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CvfmError, match="do not match its architecture") as e:
        create_captioner(str(folder))
    assert not isinstance(e.value, UsageError)


def test_more_captions_than_beams_is_a_usage_error(cli, image_folder, captioner, x):
    with pytest.raises(ValueError, match="num_beams=2"):
        captioner.generate(x, num_beams=2, num_captions=3, **GEN)
    r = cli("caption", "cvfm/tiny-blip", "--data", image_folder, "--num-beams", "2", "--num-captions", "3")
    assert_usage_error(r, "--num-captions 3", "--num-beams 2")
