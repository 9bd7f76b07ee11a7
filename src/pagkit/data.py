"""Fashion-MNIST from MNIST-format IDX files (the Debian package ``dataset-fashion-mnist`` by default)."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW_TO_GET = (
    "install it with `sudo apt-get install -y dataset-fashion-mnist`, or pass a folder of "
    "MNIST-format IDX files with --data-dir (or set PAGKIT_DATA_DIR)"
)


class DatasetError(RuntimeError):
    """The dataset is missing or malformed; the message says how to get it."""


def data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The dataset folder: the argument, else ``$PAGKIT_DATA_DIR``, else the Debian package's folder."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get("PAGKIT_DATA_DIR", DEFAULT_DIR))


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    raise DatasetError(f"Fashion-MNIST file {stem}[.gz] not found in {folder}: {_HOW_TO_GET}")


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzip or raw) of unsigned bytes into an array, checking its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read {path} ({e}): the file is corrupt; {_HOW_TO_GET}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path} is not an IDX file of unsigned bytes; {_HOW_TO_GET}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated (header); {_HOW_TO_GET}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape))
    if len(raw) != header + count:
        raise DatasetError(
            f"{path} holds {len(raw) - header} bytes of data, its header says {count}: "
            f"the file is truncated or corrupt; {_HOW_TO_GET}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


@dataclass(frozen=True)
class FashionMNIST:
    """Images ``uint8 [N, 28, 28]`` and labels ``int64 [N]`` of one split."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_split(split: str = "train", folder: str | os.PathLike[str] | None = None) -> FashionMNIST:
    """Load the ``train`` or ``test`` split, with a clear error when files are missing or malformed."""
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}: use 'train' or 'test'")
    root = data_dir(folder)
    if not root.is_dir():
        raise DatasetError(f"Fashion-MNIST folder {root} does not exist: {_HOW_TO_GET}")
    img_stem, lab_stem = _FILES[split]
    images = read_idx(_find(root, img_stem))
    labels = read_idx(_find(root, lab_stem))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1:
        raise DatasetError(f"{root}: expected images [N, 28, 28] and labels [N], got {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise DatasetError(f"{root}: {len(images)} images but {len(labels)} labels in the {split} split")
    if labels.max(initial=0) > 9:
        raise DatasetError(f"{root}: labels must be 0..9, found {labels.max()}")
    return FashionMNIST(images=images, labels=labels.astype(np.int64))


def to_model_space(images: np.ndarray | torch.Tensor, size: int = 32) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float ``[N, 1, size, size]`` in [-1, 1], padded with the background value -1."""
    import torch

    x = torch.as_tensor(np.asarray(images), dtype=torch.float32) / 127.5 - 1.0
    pad = size - x.shape[-1]
    if pad < 0 or pad % 2:
        raise ValueError(f"cannot pad 28x28 images to {size}x{size}: use an even size >= 28")
    x = torch.nn.functional.pad(x, (pad // 2,) * 4, value=-1.0)
    return x.unsqueeze(1)


def to_uint8(x: torch.Tensor, size: int = 28) -> np.ndarray:
    """Model-space ``[N, 1, S, S]`` in [-1, 1] -> uint8 ``[N, size, size]``, center-cropped back."""
    import torch

    crop = (x.shape[-1] - size) // 2
    x = x[:, 0, crop : crop + size, crop : crop + size]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
