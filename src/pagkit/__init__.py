"""pagkit: Perturbed-Attention Guidance (Ahn et al., ECCV 2024) for any diffusers model and pipeline.

The names below load on first use (PEP 562), so ``import pagkit`` and the ``pagkit`` command start without
importing torch or diffusers. To export a name, add ``"name": "module.path"`` to ``_EXPORTS``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "CFG": "pagkit.guidance",
    "PAG": "pagkit.guidance",
    "GuidedDenoiser": "pagkit.guidance",
    "Schedule": "pagkit.guidance",
    "Step": "pagkit.guidance",
    "SAG": "pagkit.guidance",
    "Branch": "pagkit.guidance",
    "Term": "pagkit.guidance",
    "Guidance": "pagkit.guidance",
    "SoftPAG": "pagkit.guidance",
    "HeadPAG": "pagkit.guidance",
    "SEG": "pagkit.guidance",
    "SLG": "pagkit.guidance",
    "TPG": "pagkit.guidance",
    "AutoGuidance": "pagkit.guidance",
    "APG": "pagkit.guidance",
    "CFGZeroStar": "pagkit.guidance",
    "CFGPP": "pagkit.guidance",
    "RescaledCFG": "pagkit.guidance",
    "parse_guidance": "pagkit.guidance",
    "terms_of": "pagkit.guidance",
    "PAGHandle": "pagkit.integrations.diffusers",
    "GuidanceHandle": "pagkit.integrations.diffusers",
    "apply_pag": "pagkit.integrations.diffusers",
    "apply_guidance": "pagkit.integrations.diffusers",
    "LayerSpecError": "pagkit.layers",
    "list_layers": "pagkit.layers",
    "select_layers": "pagkit.layers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pagkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
