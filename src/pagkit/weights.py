"""Safetensors I/O with a JSON config in the file's metadata; nothing is ever unpickled.

Files written by :func:`save_tensors` carry a sha256 of their tensors (names, dtypes, shapes, bytes) in their
metadata; :func:`load_tensors` checks it, and that every floating-point tensor is finite, so a truncated,
bit-flipped or NaN-poisoned weights file or training checkpoint is a one-line :class:`WeightsError`, never a run
that samples black images. Files without the checksum (older ones) are still read, with the finiteness check.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagkit.store import atomic_write

if TYPE_CHECKING:
    import torch

__all__ = ["WeightsError", "atomic_write", "load_tensors", "save_tensors", "tensor_checksum"]
CHECKSUM_META = "pagkit_sha256"


class WeightsError(RuntimeError):
    """A weights file is missing, truncated or corrupt; the message says what to do."""


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 (hex) over the tensors' names, dtypes, shapes and bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_tensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
) -> None:
    """Save tensors (made contiguous), a JSON-serialisable ``meta`` dict and their checksum, atomically."""
    from safetensors.torch import save_file

    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"pagkit": json.dumps(meta or {}), CHECKSUM_META: tensor_checksum(flat)}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def _damaged(path: Path, why: str) -> WeightsError:
    return WeightsError(
        f"weights file {path} is truncated or corrupt ({why}): re-download or retrain it "
        "(only safetensors files written by pagkit are accepted)"
    )


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors and the ``meta`` dict written by :func:`save_tensors`, checked; clear errors otherwise."""
    import torch
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found: check the path, or reinstall pagkit")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(metadata.get("pagkit", "{}"))
    except MemoryError:
        raise
    except BaseException as e:  # SafetensorError, OSError, JSON errors, and pyo3's PanicException on garbage
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _damaged(path, first) from e
    if not isinstance(meta, dict):
        raise _damaged(path, "its metadata is not a JSON object")
    stored = metadata.get(CHECKSUM_META)
    if stored is not None and stored != tensor_checksum(tensors):
        raise _damaged(path, "its tensors do not match the checksum written with them")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise WeightsError(
                f"weights file {path} holds NaN or infinite values (tensor {name!r}): training diverged or the "
                "file is corrupt; use an earlier checkpoint or retrain"
            )
    return tensors, meta
