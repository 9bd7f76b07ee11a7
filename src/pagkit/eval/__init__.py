"""Evaluation: guidance configs, resumable/distributed sampling, feature networks, metrics and reports.

The names load on first use (PEP 562), so ``pagkit eval --help`` imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "ConfigError": "pagkit.eval.configs",
    "GuidanceConfig": "pagkit.eval.configs",
    "parse_config": "pagkit.eval.configs",
    "parse_configs": "pagkit.eval.configs",
    "MetricError": "pagkit.eval.metrics",
    "MetricSettings": "pagkit.eval.metrics",
    "compute_metrics": "pagkit.eval.metrics",
    "EvalError": "pagkit.eval.run",
    "EvalSettings": "pagkit.eval.run",
    "Evaluation": "pagkit.eval.run",
    "run_eval": "pagkit.eval.run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pagkit.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
