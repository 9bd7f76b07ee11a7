"""pagkit: Perturbed-Attention Guidance (Ahn et al., ECCV 2024) for any diffusers model and pipeline."""

from pagkit.guidance import CFG, PAG, GuidedDenoiser, Schedule, Step
from pagkit.integrations.diffusers import PAGHandle, apply_pag
from pagkit.layers import LayerSpecError, list_layers, select_layers

__version__ = "0.1.0"
__all__ = [
    "CFG",
    "PAG",
    "GuidedDenoiser",
    "LayerSpecError",
    "PAGHandle",
    "Schedule",
    "Step",
    "apply_pag",
    "list_layers",
    "select_layers",
]
