"""Attention as a swappable op: perturbation ops and the processor that applies them to chosen rows."""

from pagkit.attention.ops import OPS, Perturbation, make_perturbation
from pagkit.attention.processor import BatchLayoutError, PerturbedProcessor, RowPlan, patched_attention

__all__ = [
    "OPS",
    "BatchLayoutError",
    "Perturbation",
    "PerturbedProcessor",
    "RowPlan",
    "make_perturbation",
    "patched_attention",
]
