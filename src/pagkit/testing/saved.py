"""Tiny random pipelines saved to disk with ``save_pretrained``, with a local tokenizer and text encoder.

The pipelines of :mod:`pagkit.testing.families` take prompt embeddings and have no tokenizer or text encoder. For
``pagkit generate --prompt`` to run on them, :func:`save_pipeline` adds tiny, randomly initialised text encoders
(``CLIPTextModel``, ``CLIPTextModelWithProjection``, ``T5EncoderModel``, ``UMT5EncoderModel``) whose widths
match the denoiser's cross-attention, and a tokenizer built offline from a small character vocabulary (a byte-level
BPE without merges: every letter is a token), then saves the whole pipeline to a folder. Nothing is downloaded.

Saved families: ``sd15``, ``sdxl``, ``flux``, ``wan`` (prompt), ``dit`` (class labels), ``ddpm`` (unconditional).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

__all__ = ["SAVED", "save_pipeline", "tiny_clip", "tiny_t5", "tiny_tokenizer"]

SAVED = ("sd15", "sdxl", "flux", "wan", "dit", "ddpm")
TOKENS = 8  # the CLIP tokenizers' model_max_length (CLIP's position embeddings)


def _vocab() -> dict[str, int]:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return vocab


def tiny_tokenizer(max_length: int = TOKENS) -> Any:
    """A CLIP tokenizer over single characters (no merges), built offline."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_vocab(), merges=[], model_max_length=max_length)


def tiny_clip(hidden: int, projection: int | None = None, seed: int = 0) -> Any:
    """A 2-layer random CLIP text encoder of width ``hidden`` (with a projection head of ``projection``)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(_vocab()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TOKENS,
        projection_dim=projection or hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def tiny_t5(d_model: int, seed: int = 0, umt5: bool = False) -> Any:
    """A 1-layer random T5 (or UMT5, Wan's) encoder of width ``d_model`` over the tiny tokenizer's vocabulary."""
    import torch
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config: Any = (UMT5Config if umt5 else T5Config)(
        vocab_size=len(_vocab()),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=1,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return (UMT5EncoderModel if umt5 else T5EncoderModel)(config).eval()


def _text_components(name: str) -> dict[str, Any]:
    from pagkit.testing import families as f

    if name == "sd15":
        return {"tokenizer": tiny_tokenizer(), "text_encoder": tiny_clip(f.SD_TEXT)}
    if name == "sdxl":
        half = f.SD_TEXT // 2  # the two encoders' penultimate states are concatenated
        return {
            "tokenizer": tiny_tokenizer(),
            "text_encoder": tiny_clip(half, seed=1),
            "tokenizer_2": tiny_tokenizer(),
            "text_encoder_2": tiny_clip(f.SD_TEXT - half, projection=f.XL_POOLED, seed=2),
        }
    if name == "flux":
        return {
            "tokenizer": tiny_tokenizer(),
            "text_encoder": tiny_clip(f.POOLED, seed=1),  # pooled output -> pooled_projections
            "tokenizer_2": tiny_tokenizer(),
            "text_encoder_2": tiny_t5(f.TEXT, seed=2),
        }
    if name == "wan":
        return {"tokenizer": tiny_tokenizer(), "text_encoder": tiny_t5(f.TEXT, umt5=True)}
    return {}


def save_pipeline(name: str, folder: str | Path) -> Path:
    """Build the tiny ``name`` pipeline (one of :data:`SAVED`), give it a local tokenizer and text encoder, and
    ``save_pretrained`` it into ``folder`` (created); returns the folder."""
    from pagkit.testing import families

    if name not in SAVED:
        raise KeyError(f"unknown saved pipeline {name!r}; known: {', '.join(SAVED)}")
    pipe = families.get(name).build()
    text = _text_components(name)
    if text:
        pipe.register_modules(**text)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
