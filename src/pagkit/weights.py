"""Safetensors I/O with a JSON config in the file's metadata; nothing is ever unpickled."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


class WeightsError(RuntimeError):
    """A weights file is missing, truncated or corrupt; the message says what to do."""


def atomic_write(path: str | os.PathLike[str], write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
) -> None:
    """Save tensors (made contiguous) and a JSON-serialisable ``meta`` dict, atomically."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"pagkit": json.dumps(meta or {})}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors and the ``meta`` dict written by :func:`save_tensors`, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found: check the path, or reinstall pagkit")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("pagkit", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise WeightsError(
            f"weights file {path} is truncated or corrupt ({e}): re-download or retrain it "
            "(only safetensors files are accepted)"
        ) from e
    return tensors, meta
