"""pagkit's recommended sampling settings for the embedded model (no torch here: the CLI reads them at once)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recommended:
    """pagkit's recommended PAG settings for the embedded model, from the evaluation sweeps (docs/results.md):
    s = 2 on the mid block gives the lowest FID of the unconditional 50-step DDIM sweep (FID -25%, IS +10%
    against unguided sampling; s = 3 is about as good, s = 5 over-guides), and the mid block is the best single
    layer of the layer ablation."""

    pag_scale: float = 2.0
    pag_layers: str = "mid"
    steps: int = 50
    sampler: str = "ddim"


RECOMMENDED = Recommended()
