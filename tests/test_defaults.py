"""Defaults live in one place each; these pin the paper's and our documented values."""

from __future__ import annotations

import inspect

import pagkit
from pagkit.generate import RECOMMENDED
from pagkit.guidance import PAG
from pagkit.models.unet import DenoiserConfig
from pagkit.train.denoiser import TrainConfig


def test_paper_defaults() -> None:
    # Ahn et al.: s = 3 with CFG (and diffusers' default pag_scale), identity perturbation, constant over the run
    assert inspect.signature(pagkit.apply_pag).parameters["scale"].default == 3.0
    assert inspect.signature(pagkit.apply_pag).parameters["perturbation"].default == "identity"
    assert PAG().scale == 3.0 and PAG().perturbation.name == "identity" and PAG().schedule.kind == "constant"
    # tuned by the evaluation sweep (docs/results.md, scripts/paper_results.sh sweep): s = 2 on the mid block
    assert (RECOMMENDED.pag_scale, RECOMMENDED.pag_layers, RECOMMENDED.steps, RECOMMENDED.sampler) == (
        2.0,
        "mid",
        50,
        "ddim",
    )


def test_embedded_model_defaults() -> None:
    c = DenoiserConfig()
    assert c.sample_size == 32 and c.num_classes == 10
    assert c.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")  # attention at 16, 8, mid
    assert c.scheduler_config()["clip_sample"] is True
    t = TrainConfig()
    assert 0.1 <= t.label_dropout <= 0.2 and t.epochs >= 10 and t.ema_decay == 0.999
