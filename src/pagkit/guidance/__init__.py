"""Guidance: the term abstraction, the terms (CFG, PAG, SAG and the family of issue 12), pure rules, schedules,
the spec syntax and the engine.

The names below load lazily (PEP 562), so that ``pagkit.guidance.spec`` (the spec syntax, parsed by the CLI
before any model is needed) imports neither torch nor numpy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "APG": "pagkit.guidance.rules_cfg",
    "AutoGuidance": "pagkit.guidance.family",
    "Branch": "pagkit.guidance.term",
    "CFG": "pagkit.guidance.terms",
    "CFGPP": "pagkit.guidance.rules_cfg",
    "CFGZeroStar": "pagkit.guidance.rules_cfg",
    "Guidance": "pagkit.guidance.engine",
    "GuidedDenoiser": "pagkit.guidance.engine",
    "HeadPAG": "pagkit.guidance.family",
    "PAG": "pagkit.guidance.terms",
    "RescaledCFG": "pagkit.guidance.rules_cfg",
    "SAG": "pagkit.guidance.sag",
    "SEG": "pagkit.guidance.family",
    "SLG": "pagkit.guidance.family",
    "Schedule": "pagkit.guidance.schedules",
    "SoftPAG": "pagkit.guidance.family",
    "Step": "pagkit.guidance.schedules",
    "TPG": "pagkit.guidance.family",
    "Term": "pagkit.guidance.term",
    "cfg_delta": "pagkit.guidance.rules",
    "pag_delta": "pagkit.guidance.rules",
    "parse_guidance": "pagkit.guidance.spec",
    "parse_schedule": "pagkit.guidance.schedules",
    "terms_of": "pagkit.guidance.spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pagkit.guidance' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
