"""Inverse problems with PAG: measurement operators, DPS (Chung et al. 2022) on the embedded pixel model and a
hook for diffusers latent pipelines (PSLD-style), restoration metrics.

The names load on first use (PEP 562), so ``pagkit restore --help`` imports no torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS: dict[str, str] = {
    "dps_sample": "pagkit.inverse.dps",
    "measurement_gradient": "pagkit.inverse.dps",
    "predicted_x0": "pagkit.inverse.dps",
    "TASKS": "pagkit.inverse.operators",
    "GaussianDeblur": "pagkit.inverse.operators",
    "Inpaint": "pagkit.inverse.operators",
    "Operator": "pagkit.inverse.operators",
    "OperatorError": "pagkit.inverse.operators",
    "SuperResolution": "pagkit.inverse.operators",
    "make_operator": "pagkit.inverse.operators",
    "register": "pagkit.inverse.operators",
    "RESTORE": "pagkit.inverse.restore",
    "measure": "pagkit.inverse.restore",
    "restore": "pagkit.inverse.restore",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pagkit.inverse' has no attribute {name!r}")
    loaded = importlib.import_module(module)
    for other, where in _EXPORTS.items():  # every name of that module, over the submodule binding below
        if where == module:
            globals()[other] = getattr(loaded, other)
    return globals()[name]


class _Package(types.ModuleType):
    """Importing the submodule ``pagkit.inverse.restore`` would bind it as ``pagkit.inverse.restore``; the
    package's ``restore`` stays the function (as when this package imported everything eagerly)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
