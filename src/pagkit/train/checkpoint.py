"""Resumable training checkpoints as safetensors: model, EMA, optimizer moments and counters.

A checkpoint is two files, each small enough to commit: ``checkpoint.safetensors`` (model, EMA, meta) and
``checkpoint-optimizer.safetensors`` (AdamW moments), both carrying the step and the checksum that
:func:`pagkit.weights.save_tensors` writes. A save writes the optimizer file under a ``.next`` name first, then
the checkpoint, then renames the ``.next`` file into place, so a run killed at any moment leaves a pair that
belongs together: :func:`load_checkpoint` picks the optimizer file of the checkpoint's step and refuses a pair
that does not match.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pagkit.weights import WeightsError, load_tensors, save_tensors


def _optimizer_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path.with_name(path.stem + "-optimizer.safetensors")


def _pending_path(path: str | os.PathLike[str]) -> Path:
    opt = _optimizer_path(path)
    return opt.with_name(opt.name + ".next")


def save_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
) -> None:
    """Write every tensor needed to resume (atomically, as a matching pair of files)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt = optimizer.state_dict()
    moments = {
        f"opt.{idx}.{name}": torch.as_tensor(value)
        for idx, state in opt["state"].items()
        for name, value in state.items()
    }
    pending = _pending_path(path)
    save_tensors(pending, moments, {"param_groups": opt["param_groups"], "step": meta.get("step")})
    save_tensors(path, tensors, meta)
    os.replace(pending, _optimizer_path(path))


def load_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    """Restore model, EMA and optimizer in place from :func:`save_checkpoint`; return its meta.

    A damaged or mismatched file is a :class:`~pagkit.weights.WeightsError` (one line, nothing restored)."""
    path = Path(path)
    tensors, meta = load_tensors(path)
    step = meta.get("step")
    pending = _pending_path(path)
    if pending.is_file():  # a save was cut short: keep the optimizer file that matches the checkpoint
        try:
            pending_step = load_tensors(pending)[1].get("step")
        except WeightsError:
            pending_step = None
        if pending_step is not None and pending_step == step:
            os.replace(pending, _optimizer_path(path))
        else:
            pending.unlink()
    opt_path = _optimizer_path(path)
    if not opt_path.is_file():
        raise WeightsError(f"{opt_path} (the optimizer state of {path}) is missing: restore it, or start afresh")
    moments, opt_meta = load_tensors(opt_path)
    if opt_meta.get("step", step) != step:
        raise WeightsError(
            f"{opt_path} is of step {opt_meta.get('step')} but {path} of step {step}: "
            "they do not belong together; restore both files, or start afresh"
        )
    state: dict[int, dict[str, torch.Tensor]] = {}
    try:
        for k, v in moments.items():
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if ema is not None:
            ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        optimizer.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"checkpoint {path} does not match this model and optimizer ({first})") from e
    return meta
