"""Bad input to the engine gets a clear error naming the fix; nothing falls back silently."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import pagkit
from pagkit.interventions.attention import PerturbationError
from pagkit.interventions.rows import BatchLayoutError, CallRows, marked, rows_for
from pagkit.testing import checks, families


def test_unknown_layout_names_the_choices() -> None:
    fam = families.get("sd15")
    with pytest.raises(ValueError, match="uncond-cond, cond-uncond, per-call, cond"):
        pagkit.apply_pag(fam.build(), layers=fam.layers, layout="halves")


def test_a_layer_whose_attention_is_not_intercepted_raises() -> None:
    """A processor that multiplies the map by hand (no scaled_dot_product_attention): an error, never a no-op."""
    fam = families.get("wan")
    pipe = fam.build()
    attn = pipe.transformer.blocks[0].attn1

    class ByHand:
        def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            p = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
            return attn.to_out[0](p @ v)

    attn.processor = ByHand()
    with pagkit.apply_pag(pipe, scale=2.0, layers="blocks.0.attn1"), pytest.raises(PerturbationError, match="native"):
        checks.run(pipe, fam)
    checks.run(pipe, fam)  # restored: runs without pagkit


def test_cross_attention_layer_is_refused_by_name() -> None:
    fam = families.get("wan")
    with pytest.raises(pagkit.LayerSpecError, match="cross-attention layer"):
        pagkit.apply_pag(fam.build(), layers="blocks.0.attn2")


def test_rows_that_cannot_be_mapped_raise() -> None:
    with marked(CallRows(4, {0: torch.tensor([False, False, True, True])})):
        assert rows_for(0, 8, "x").tolist() == [False] * 4 + [True] * 4  # (b f) with f = 2
        with pytest.raises(BatchLayoutError, match="folds its batch"):
            rows_for(0, 6, "layer x")


def test_per_call_layout_with_the_unconditional_call_first_raises() -> None:
    fam = families.get("wan")
    pipe = fam.build()
    model = pipe.transformer
    rec: list[tuple[Any, dict[str, Any]]] = []
    hook = model.register_forward_pre_hook(lambda m, a, k: rec.append((a, dict(k))), with_kwargs=True)
    checks.run(pipe, fam)
    hook.remove()
    (args, kwargs) = rec[0]
    with pagkit.apply_pag(model, scale=2.0, layers=fam.layers, layout="per-call", scheduler=pipe.scheduler) as h:
        h.layout._context = "uncond"  # type: ignore[attr-defined]
        with pytest.raises(BatchLayoutError, match="conditional call first"):
            model(*args, **kwargs)


def test_halves_with_different_latents_raise() -> None:
    fam = families.get("sd15")
    pipe = fam.build()
    x = torch.randn(2, 4, 8, 8)
    with pagkit.apply_pag(pipe.unet, layers=fam.layers, cfg=True), pytest.raises(BatchLayoutError, match="layout"):
        pipe.unet(x, 10, encoder_hidden_states=torch.randn(2, 7, pipe.unet.config.cross_attention_dim))


def test_a_cfg_term_on_a_pipeline_names_guidance_scale() -> None:
    """A CFG term is folded into the pipeline's own CFG; called with another guidance_scale it names the fix."""
    fam = families.get("sd15")
    pipe = fam.build()
    with pytest.raises(BatchLayoutError, match="guidance_scale=3"), pagkit.apply_guidance(pipe, pagkit.CFG(3.0)):
        pipe(**{**fam.call((0,)), "guidance_scale": 7.5})
