"""PAG on every pipeline family (tiny random pipelines from diffusers' test configs), through the one engine.

Each supported family passes every check of :mod:`pagkit.testing.checks`; a family pagkit refuses raises a clear
error naming the reason (``pagkit.integrations.diffusers.UNSUPPORTED``, at most three, listed in docs/support.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import pagkit
from pagkit.integrations.diffusers import UNSUPPORTED
from pagkit.testing import checks, families

_PIPES: dict[str, Any] = {}


def _pipe(name: str) -> Any:
    if name not in _PIPES:
        _PIPES.clear()  # keep one family in memory at a time
        _PIPES[name] = families.get(name).build()
    return _PIPES[name]


def _unsupported(name: str) -> str | None:
    fam = families.get(name)
    return UNSUPPORTED.get(type(getattr(_pipe(name), fam.denoiser)).__name__)


def _params() -> list[Any]:
    out = []
    for name, fam in families.FAMILIES.items():
        marks = [pytest.mark.slow] if fam.slow else []
        for check in checks.CHECKS:
            out.append(pytest.param(name, check, marks=marks, id=f"{name}-{check.split()[0].strip(',')}"))
    return out


@pytest.mark.parametrize(("name", "check"), _params())
def test_family(name: str, check: str) -> None:
    fam = families.get(name)
    reason = _unsupported(name)
    if reason is not None:
        with pytest.raises(NotImplementedError, match=r"docs/support\.md"):
            pagkit.apply_pag(_pipe(name), scale=2.0, layers=fam.layers)
        return
    fn: Callable[[Any, families.Family], None] = checks.CHECKS[check]
    fn(_pipe(name), fam)


def test_at_most_three_families_are_refused() -> None:
    assert len(UNSUPPORTED) <= 3
