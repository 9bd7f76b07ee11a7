"""Attention perturbation ops (what a perturbed layer computes); :mod:`pagkit.interventions` applies them."""

from pagkit.attention.ops import OPS, Perturbation, make_perturbation

__all__ = ["OPS", "Perturbation", "make_perturbation"]
