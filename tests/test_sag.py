"""SAG (Hong et al. 2023) equals a direct computation on a tiny model, composes with CFG/PAG, restores the model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from diffusers.models.attention_processor import AttnProcessor

from pagkit.cli import main
from pagkit.generate import generate
from pagkit.guidance import CFG, PAG, GuidedDenoiser, Step
from pagkit.guidance.sag import SAG
from pagkit.interventions.attention import perturbed
from pagkit.models.unet import load_denoiser
from pagkit.sampling import make_scheduler
from tiny import tiny_unet2d, write_tiny_denoiser

SCHED = {"num_train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2", "clip_sample": False}
T = 60  # a timestep with a mid-range noise level


def _blur_direct(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """An independent 2-D Gaussian blur (radius ceil(3 sigma), reflect padding)."""
    r = max(1, math.ceil(3 * sigma))
    g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k2 = torch.outer(g, g) / g.sum() ** 2
    return F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), k2.view(1, 1, 2 * r + 1, 2 * r + 1))


def _direct_sag(unet: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None, scale: float) -> torch.Tensor:
    """SAG written out from the paper with diffusers' plain attention processor and scheduler."""
    attn = unet.mid_block.attentions[0]
    maps: list[torch.Tensor] = []
    original_scores = attn.get_attention_scores
    attn.set_processor(AttnProcessor())
    attn.get_attention_scores = lambda *a, **k: maps.append(original_scores(*a, **k)) or maps[-1]  # type: ignore[method-assign]
    kw = {} if y is None else {"class_labels": y}
    try:
        eps_c = unet(x, T, **kw).sample
    finally:
        del attn.get_attention_scores
    b, heads = x.shape[0], attn.heads
    probs = maps[0].view(b, heads, 64, 64)  # the 8x8 mid grid
    received = probs.mean(1).sum(1)
    mask = (received > received.mean(-1, keepdim=True)).float().view(b, 1, 8, 8)
    mask = mask.repeat_interleave(2, -1).repeat_interleave(2, -2)  # nearest upsampling to 16x16
    assert 0 < mask.mean() < 1
    scheduler = make_scheduler("ddim", SCHED)
    a = scheduler.alphas_cumprod[T]
    x0 = (x - (1 - a).sqrt() * eps_c) / a.sqrt()
    x0_degraded = mask * _blur_direct(x0, 1.0) + (1 - mask) * x0
    x_degraded = scheduler.add_noise(x0_degraded, eps_c, torch.tensor([T]))
    eps_sag = unet(x_degraded, T, **kw).sample
    return eps_c + scale * (eps_c - eps_sag)


def _step() -> Step:
    a = float(make_scheduler("ddim", SCHED).alphas_cumprod[T])
    return Step(fraction=0.5, sigma=math.sqrt((1 - a) / a))


def test_sag_equals_direct_computation() -> None:
    unet = tiny_unet2d()
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    guided = GuidedDenoiser(unet, {}, None, [SAG.make(0.8, "mid")])
    ours = guided(x, torch.tensor(T), _step())
    expected = _direct_sag(unet, x, None, 0.8)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    assert (ours - unet(x, T).sample).abs().max() > 1e-3  # SAG changed the prediction


def test_sag_composes_with_cfg_and_pag_on_the_same_layer() -> None:
    unet = tiny_unet2d(num_class_embeds=11)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    y, null = torch.tensor([3, 7]), torch.tensor([10, 10])
    eps_c = unet(x, T, class_labels=y).sample
    eps_u = unet(x, T, class_labels=null).sample
    with perturbed(unet, "mid", torch.ones(2, dtype=torch.bool)):
        eps_p = unet(x, T, class_labels=y).sample
    sag_only = _direct_sag(unet, x, y, 0.5) - eps_c  # s (eps_c - eps_sag)
    unet.mid_block.attentions[0].set_processor(unet.up_blocks[0].attentions[0].processor)  # back to the default
    terms = [CFG(2.0), PAG.make(1.5, "mid"), SAG.make(0.5, "mid")]
    guided = GuidedDenoiser(unet, {"class_labels": y}, {"class_labels": null}, terms)
    expected = eps_u + 2.0 * (eps_c - eps_u) + 1.5 * (eps_c - eps_p) + sag_only
    torch.testing.assert_close(guided(x, torch.tensor(T), _step()), expected, atol=1e-4, rtol=1e-4)


def test_sag_scale_zero_is_exactly_unguided_and_skips_the_pass() -> None:
    unet = tiny_unet2d()
    calls: list[int] = []
    unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    x = torch.randn(2, 1, 16, 16)
    out = GuidedDenoiser(unet, {}, None, [SAG.make(0.0)])(x, torch.tensor(T), Step())  # no sigma needed
    assert calls == [2]
    assert torch.equal(out, unet(x, T).sample)
    calls.clear()
    GuidedDenoiser(unet, {}, None, [SAG.make(1.0, schedule="interval:0:0.4")])(x, torch.tensor(T), _step())
    assert calls == [2]  # outside the interval: no capture, no second pass


def test_sag_restores_processors_after_an_exception() -> None:
    unet = tiny_unet2d()
    before = {name: m.processor for name, m in unet.named_modules() if hasattr(m, "processor")}
    guided = GuidedDenoiser(unet, {}, None, [SAG.make(1.0), PAG.make(1.0)])

    def boom(module: torch.nn.Module, args: tuple) -> None:
        raise RuntimeError("interrupted")

    handle = unet.up_blocks[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        guided(torch.randn(1, 1, 16, 16), torch.tensor(T), _step())
    handle.remove()
    after = {name: m.processor for name, m in unet.named_modules() if hasattr(m, "processor")}
    assert all(after[k] is v for k, v in before.items())


def test_sag_errors() -> None:
    unet = tiny_unet2d()
    with pytest.raises(ValueError, match="sigma"):
        GuidedDenoiser(unet, {}, None, [SAG.make(1.0)])(torch.randn(1, 1, 16, 16), torch.tensor(T), Step())
    with pytest.raises(ValueError, match="matches no self-attention"):
        GuidedDenoiser(unet, {}, None, [SAG.make(1.0, "down.0")])
    with pytest.raises(ValueError, match="blur sigma"):
        SAG.make(1.0, blur_sigma=0.0)
    with pytest.raises(ValueError, match="at most one"):
        GuidedDenoiser(unet, {}, None, [SAG.make(1.0), SAG.make(2.0)])


def test_sag_defaults_pinned() -> None:
    sag = SAG()
    assert (sag.scale, sag.layer, sag.blur_sigma) == (0.75, "mid", 1.0)  # diffusers' default sag_scale


def test_generate_and_cli_with_sag(tmp_path: Path) -> None:
    weights = write_tiny_denoiser(tmp_path / "d.safetensors")
    model = load_denoiser(weights)
    kw = dict(steps=2, seed=3, pag_scale=0.0, model=model, progress=False)
    plain, _ = generate(2, **kw)
    sag, _ = generate(2, sag_scale=2.0, **kw)
    assert np.abs(plain.astype(int) - sag.astype(int)).max() > 0
    out = tmp_path / "s.npz"
    args = ["sample", "--weights", str(weights), "--n", "2", "--steps", "2", "--pag-scale", "0"]
    result = CliRunner().invoke(
        main, [*args, "--seed", "3", "--sag-scale", "2", "--sag-layers", "mid", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.load(out)["images"], sag)
