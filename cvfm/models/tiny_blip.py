"""`cvfm/tiny-blip`: BLIP captioner and matcher small enough for CPU runs, with a tokenizer built offline.

The tokenizer is a real `BertTokenizer` (WordPiece, lower-cased, as BLIP's) over a small vocabulary:
the built-in captions' words and common prompt words as whole tokens, and every lower-case letter,
digit and punctuation mark alone and as a `##` continuation, so any English text tokenizes. BLIP's
two extra tokens close the vocabulary: `[DEC]` (the decoder's start token) and `[ENC]`.
"""

from __future__ import annotations

import string

from cvfm.models.tiny_clip import CORPUS_WORDS

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARS = list(string.ascii_lowercase + string.digits + string.punctuation)


def vocab() -> dict[str, int]:
    words = list(dict.fromkeys(w.lower() for w in CORPUS_WORDS))
    tokens = SPECIALS + CHARS + [f"##{c}" for c in CHARS] + [w for w in words if w not in CHARS]
    tokens += ["[DEC]", "[ENC]"]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def build_tokenizer(max_length: int = 40):
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab=vocab(), do_lower_case=True, model_max_length=max_length)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


def tiny_blip_config(size: int = 32, patch: int = 8, width: int = 128, layers: int = 2, context: int = 40):
    """A BlipConfig: ViT image tower and BERT-style text tower, both `width` wide, `layers` deep."""
    from transformers import BlipConfig

    ids = vocab()
    heads = max(1, width // 32)
    return BlipConfig(
        text_config={
            "vocab_size": len(ids),
            "hidden_size": width,
            "encoder_hidden_size": width,
            "intermediate_size": 4 * width,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "max_position_embeddings": context,
            "bos_token_id": ids["[DEC]"],
            "pad_token_id": ids["[PAD]"],
            "sep_token_id": ids["[SEP]"],
            "eos_token_id": ids["[SEP]"],
        },
        vision_config={
            "hidden_size": width,
            "intermediate_size": 4 * width,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "image_size": size,
            "patch_size": patch,
            # BlipVisionConfig's default (1e-10, for loading pretrained weights) would leave a random
            # image tower that outputs ~0: captions and ITM scores would not depend on the image.
            "initializer_range": 0.02,
        },
        image_text_hidden_size=64,
    )


def build_tiny_blip(model_cls, seed: int = 0):
    """`model_cls(tiny_blip_config())` with weights drawn from a fixed seed (the global RNG untouched), so
    `cvfm/tiny-blip` is the same model in every process: a resumed caption run continues the same model.
    `model_cls`: BlipForConditionalGeneration or BlipForImageTextRetrieval."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(tiny_blip_config())
