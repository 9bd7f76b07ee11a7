"""Interventions: what a weak guidance branch changes in the model, on the rows declared for it."""

from pagkit.interventions.attention import AttentionPerturbation, PerturbationError
from pagkit.interventions.base import Intervention
from pagkit.interventions.rows import BatchLayoutError, CallRows

__all__ = ["AttentionPerturbation", "BatchLayoutError", "CallRows", "Intervention", "PerturbationError"]
