"""The reference image set (Fashion-MNIST test split by default) and its cached features.

Reference features are cached on disk as ``ref-<data hash>-<feature-net fingerprint>.npz`` (written with an
atomic rename), so a second evaluation against the same data and network skips the feature pass.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from pagkit.data import load_split
from pagkit.eval.features import FeatureNet, extract
from pagkit.weights import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class ReferenceSetError(ValueError):
    """The reference set is missing or not a set of 28x28 grey images."""


def default_cache_dir() -> Path:
    """``$PAGKIT_CACHE_DIR`` or ``~/.cache/pagkit``."""
    return Path(os.environ.get("PAGKIT_CACHE_DIR", Path.home() / ".cache" / "pagkit"))


def check_images(images: np.ndarray, what: str) -> np.ndarray:
    """Accept uint8 ``[N, 28, 28]`` (or ``[N, 28, 28, 1]`` / ``[N, 1, 28, 28]``); anything else is an error."""
    if not isinstance(images, np.ndarray):
        raise ReferenceSetError(f"{what}: expected an array of images, got {type(images).__name__}")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    elif images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ReferenceSetError(f"{what}: expected grey images [N, 28, 28], got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ReferenceSetError(f"{what}: expected uint8 pixels 0..255, got {images.dtype}")
    if len(images) < 2:
        raise ReferenceSetError(f"{what}: need at least 2 images, got {len(images)}")
    return np.ascontiguousarray(images)


def _load_folder(folder: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ReferenceSetError(f"reference folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for path in files:
        with Image.open(path) as img:
            if img.size != (28, 28):
                raise ReferenceSetError(f"reference image {path} is {img.size[0]}x{img.size[1]}, expected 28x28")
            images.append(np.asarray(img.convert("L"), dtype=np.uint8))
    return np.stack(images)


def load_reference(spec: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, str]:
    """Reference images uint8 ``[N, 28, 28]`` and a description.

    ``None``/``test``/``train``: a Fashion-MNIST split; a ``.npz`` (key ``images``, as ``pagkit sample`` writes);
    a folder of 28x28 images.
    """
    if spec is None or str(spec) in ("test", "train"):
        split = "test" if spec is None else str(spec)
        return check_images(load_split(split).images, f"Fashion-MNIST {split}"), f"fashion-mnist:{split}"
    path = Path(spec)
    if path.is_dir():
        return check_images(_load_folder(path), f"reference folder {path}"), f"folder:{path}"
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise ReferenceSetError(f"reference file {path} not found")
        with np.load(path, allow_pickle=False) as data:
            if "images" in data.files:
                images = data["images"]
            elif len(data.files) == 1:
                images = data[data.files[0]]
            else:
                raise ReferenceSetError(f"{path}: expected an array named 'images', found {', '.join(data.files)}")
        return check_images(images, f"reference {path}"), f"npz:{path}"
    raise ReferenceSetError(f"unknown reference {str(spec)!r}: use test, train, a .npz with 'images', or a folder")


def data_digest(images: np.ndarray) -> str:
    h = hashlib.sha256(f"{images.dtype}:{images.shape}".encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()[:16]


def reference_features(
    images: np.ndarray,
    net: FeatureNet,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 250,
    progress: bool = True,
) -> tuple[np.ndarray, Path | None]:
    """Features ``float32 [N, d]`` of the reference set, read from / written to the cache; and the cache path."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"ref-{data_digest(images)}-{net.fingerprint}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as data:
                    features = data["features"]
                if features.shape == (len(images), net.num_features) and np.isfinite(features).all():
                    return features, path
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache: recompute and overwrite
    features = extract(net, images, batch_size, progress, desc="reference features")
    if path is not None:

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, features=features, fingerprint=np.array(net.fingerprint))

        atomic_write(path, write)
    return features, path
