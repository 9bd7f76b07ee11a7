"""Command-line option types and checks shared by every ``pagkit`` command (click only: nothing heavy)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pagkit.threads import threads_option as threads_option  # re-exported: one --threads everywhere

MAX_IMAGES = 2**24  # image indices lie in [0, 2**24) (pagkit.generate.MAX_IMAGES)
MAX_PNG_IMAGES = 10_000  # a larger grid is an unwieldy PNG: write .npz
IMAGE_BYTES = 28 * 28 + 8  # one uint8 image and its int64 label
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class FiniteFloat(click.ParamType):
    """A finite float (no nan, no inf)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"must be a finite number, got {value!r}", param, ctx)
        return number


FINITE = FiniteFloat()
POSITIVE = click.IntRange(min=1)
POSITIVE_FLOAT = click.FloatRange(min=0, min_open=True)
N_IMAGES = click.IntRange(min=1, max=MAX_IMAGES)
SEED = click.IntRange(min=0, max=2**39 - 1)  # image i's generator is seeded with seed * 2**24 + i (< 2**63)


def device_option() -> Decorator:
    return click.option(
        "--device", default="cpu", show_default=True, help="Where the denoiser runs: cpu, cuda, cuda:1."
    )


def progress_option() -> Decorator:
    return click.option("--no-progress", is_flag=True, help="Hide the progress bars.")


def check_output(path: str, suffixes: tuple[str, ...]) -> Path:
    """Fail fast (before any sampling) on an output path that cannot be written."""
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise ValueError(f"output {path!r} must end in {' or '.join(suffixes)}")
    if out.is_dir():
        raise ValueError(f"cannot write {path}: it is a folder (give a file name ending in {' or '.join(suffixes)})")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"cannot write {path}: folder {parent} does not exist (create it first)")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"cannot write {path}: permission denied (choose another --out)")
    return out


def check_sample_size(out: Path, n: int) -> None:
    """One-line errors for an output that cannot hold ``n`` images: a PNG too large, or too little disk space."""
    from pagkit.store import free_bytes, human_bytes

    if out.suffix.lower() == ".png" and n > MAX_PNG_IMAGES:
        raise ValueError(f"a PNG grid holds at most {MAX_PNG_IMAGES:,} images, got --n {n:,}: write an .npz instead")
    need = 2 * n * IMAGE_BYTES + (1 << 20)  # the parts, then the joined file
    free = free_bytes(out.parent if str(out.parent) else ".")
    if free is not None and need > free:
        raise ValueError(
            f"--n {n:,} needs about {human_bytes(need)} of disk space beside {out} (its parts, then the file); "
            f"{human_bytes(free)} is free"
        )


def check_spec(value: str | None, option: str) -> None:
    """A layer spec given on the command line must not be empty (it would silently mean the default)."""
    if value is not None and not value.strip():
        raise ValueError(f"{option} is empty: give a layer spec such as mid (`pagkit layers` lists the layers)")
