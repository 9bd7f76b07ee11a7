"""The reference image set (Fashion-MNIST test split by default) and its cached features.

Reference features are cached on disk as ``ref-<data hash>-<feature-net fingerprint>.npz`` (written with an
atomic rename and a checksum of its content), so a second evaluation against the same data and network skips the
feature pass; a cache that fails its checks is recomputed and overwritten.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from pagkit.data import load_split
from pagkit.eval.features import FeatureNet, extract
from pagkit.store import DamagedFile, load_arrays, notice, read_npz, save_arrays

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
        try:
            with Image.open(path) as img:
                if img.size != (28, 28):
                    raise ReferenceSetError(f"reference image {path} is {img.size[0]}x{img.size[1]}, expected 28x28")
                images.append(np.asarray(img.convert("L"), dtype=np.uint8))
        except (OSError, ValueError, SyntaxError) as e:  # PIL: unidentified, truncated or corrupt images
            if isinstance(e, ReferenceSetError):
                raise
            raise ReferenceSetError(f"reference image {path} cannot be read ({e})") from e
    return np.stack(images)


def load_reference(
    spec: str | os.PathLike[str] | None = None, data_dir: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, str]:
    """Reference images uint8 ``[N, 28, 28]`` and a description.

    ``None``/``test``/``train``: a Fashion-MNIST split (from ``data_dir``, see :func:`pagkit.data.data_dir`); a
    ``.npz`` (key ``images``, as ``pagkit sample`` writes); a folder of 28x28 images. A truncated or corrupt file
    is a one-line :class:`ReferenceSetError`.
    """
    if spec is None or str(spec) in ("test", "train"):
        split = "test" if spec is None else str(spec)
        return check_images(load_split(split, data_dir).images, f"Fashion-MNIST {split}"), f"fashion-mnist:{split}"
    path = Path(spec)
    if path.is_dir():
        return check_images(_load_folder(path), f"reference folder {path}"), f"folder:{path}"
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise ReferenceSetError(f"reference file {path} not found")
        try:
            data = read_npz(path)
        except DamagedFile as e:
            raise ReferenceSetError(f"reference file {path} is truncated or corrupt: {e.reason}") from e
        data.pop("checksum", None)
        if "images" in data:
            images = data["images"]
        elif len(data) == 1:
            images = next(iter(data.values()))
        else:
            raise ReferenceSetError(f"{path}: expected an array named 'images', found {', '.join(sorted(data))}")
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
        spec = {"features": ("float32", (len(images), net.num_features or None)), "fingerprint": ("str", ())}
        if path.is_file():
            try:
                cached = load_arrays(path, spec)
                if str(cached["fingerprint"]) != net.fingerprint:
                    raise DamagedFile(path, "written for another feature network")
                if not np.isfinite(cached["features"]).all():
                    raise DamagedFile(path, "non-finite features")
                return cached["features"], path
            except DamagedFile as e:  # unreadable or wrong cache: recompute and overwrite
                notice(f"reference-feature cache {path} is damaged ({e.reason}); recomputing it")
    features = np.asarray(extract(net, images, batch_size, progress, desc="reference features"), dtype=np.float32)
    if path is not None:
        save_arrays(path, {"features": features, "fingerprint": np.array(net.fingerprint)})
    return features, path
