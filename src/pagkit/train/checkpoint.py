"""Resumable training checkpoints as safetensors: model, EMA, optimizer moments and counters."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pagkit.weights import load_tensors, save_tensors


def save_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
) -> None:
    """Write every tensor needed to resume into one safetensors file (atomically)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt = optimizer.state_dict()
    moments = {
        f"opt.{idx}.{name}": torch.as_tensor(value)
        for idx, state in opt["state"].items()
        for name, value in state.items()
    }
    # two files, each small enough to commit, so training resumes across sessions
    save_tensors(_optimizer_path(path), moments, {"param_groups": opt["param_groups"]})
    save_tensors(path, tensors, meta)


def _optimizer_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path.with_name(path.stem + "-optimizer.safetensors")


def load_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    """Restore model, EMA and optimizer in place from :func:`save_checkpoint`; return its meta."""
    tensors, meta = load_tensors(Path(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    moments, opt_meta = load_tensors(_optimizer_path(path))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in moments.items():
        _, idx, name = k.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
    return meta
