"""Dataset loading and weights files: formats, and clear errors for missing, truncated or corrupt files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from pagkit.data import DEFAULT_DIR, DatasetError, load_split, to_model_space, to_uint8
from pagkit.models.unet import load_denoiser
from pagkit.weights import WeightsError, load_tensors, save_tensors
from tiny import write_idx_dataset, write_tiny_denoiser


def test_load_synthetic_split(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, n_train=40, n_test=12)
    tr, te = load_split("train", tmp_path), load_split("test", tmp_path)
    assert tr.images.shape == (40, 28, 28) and tr.images.dtype == np.uint8
    assert te.labels.shape == (12,) and te.labels.dtype == np.int64


@pytest.mark.skipif(not (DEFAULT_DIR / "t10k-labels-idx1-ubyte.gz").exists(), reason="dataset not installed")
def test_real_test_split_shape() -> None:
    te = load_split("test")
    assert te.images.shape == (10000, 28, 28)
    assert np.bincount(te.labels).tolist() == [1000] * 10


def test_missing_folder_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="apt-get install -y dataset-fashion-mnist"):
        load_split("train", tmp_path / "nope")


def test_truncated_file(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, n_train=10, n_test=4)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DatasetError, match="truncated"):
        load_split("train", tmp_path)


def test_not_idx(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, n_train=10, n_test=4)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage, not gzip")
    with pytest.raises(DatasetError, match=r"corrupt|IDX"):
        load_split("test", tmp_path)


def test_model_space_roundtrip() -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    x = to_model_space(images)
    assert x.shape == (5, 1, 32, 32) and float(x[..., 0, 0].max()) == -1.0
    assert np.array_equal(to_uint8(x), images)


def test_weights_roundtrip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_tensors(path, {"a": torch.arange(4.0)}, {"k": 1})
    tensors, meta = load_tensors(path)
    assert torch.equal(tensors["a"], torch.arange(4.0)) and meta == {"k": 1}
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_tensors(path)
    with pytest.raises(WeightsError, match="not found"):
        load_tensors(tmp_path / "missing.safetensors")


def test_denoiser_file_roundtrip(tmp_path: Path) -> None:
    path = write_tiny_denoiser(tmp_path / "d.safetensors")
    model, config = load_denoiser(path)
    assert config.block_out_channels == (8, 16, 16)
    assert not model.training
    save_tensors(tmp_path / "other.safetensors", {"x": torch.zeros(1)}, {})
    with pytest.raises(WeightsError, match="no denoiser config"):
        load_denoiser(tmp_path / "other.safetensors")
