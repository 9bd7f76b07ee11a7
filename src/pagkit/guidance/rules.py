"""Pure combine rules of the guidance terms (Ahn et al. Eq. 7 and 8; Ho & Salimans 2022)."""

from __future__ import annotations

import math

import torch


def check_scale(name: str, value: float) -> float:
    """Reject NaN and infinite scales with an error that names the parameter."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def pag_delta(eps_cond: torch.Tensor, eps_perturbed: torch.Tensor, scale: float) -> torch.Tensor:
    """PAG's term ``s (eps_c - eps_perturbed)``, added to the (CFG-combined) prediction."""
    return scale * (eps_cond - eps_perturbed)


def cfg_delta(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG as a term added to ``eps_c``: ``eps_u + w (eps_c - eps_u) = eps_c + (w - 1)(eps_c - eps_u)``."""
    return (scale - 1.0) * (eps_cond - eps_uncond)
