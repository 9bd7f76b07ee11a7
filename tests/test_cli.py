"""The ``pagkit`` command line: outputs, and one-line errors with exit code != 0 and no partial files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pagkit.cli import main
from tiny import write_idx_dataset, write_tiny_denoiser


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_denoiser(tmp_path_factory.mktemp("w") / "d.safetensors")


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_sample_npz(tmp_path: Path, weights: Path) -> None:
    out = tmp_path / "s.npz"
    code, output = run(
        "sample",
        "--weights",
        str(weights),
        "--n",
        "3",
        "--steps",
        "2",
        "--label",
        "4",
        "--cfg-scale",
        "2",
        "--pag-scale",
        "1",
        "--out",
        str(out),
    )
    assert code == 0, output
    data = np.load(out)
    assert data["images"].shape == (3, 28, 28) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [4, 4, 4] and data["labels"].dtype == np.int64


def test_sample_png_unconditional(tmp_path: Path, weights: Path) -> None:
    out = tmp_path / "s.png"
    code, output = run(
        "sample", "--weights", str(weights), "--n", "2", "--steps", "2", "--sampler", "ddpm", "--out", str(out)
    )
    assert code == 0, output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layers_lists_resolutions(weights: Path) -> None:
    code, output = run("layers", "--weights", str(weights))
    assert code == 0
    assert "mid_block.attentions.0  [self, 8x8]" in output
    assert "down_blocks.1.attentions.0  [self, 16x16]" in output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--label", "12"], "Invalid value for '--label'"),
        (["--steps", "-1"], "steps must be >= 1"),
        (["--sampler", "euler"], "Invalid value for '--sampler'"),
        (["--pag-scale", "nan"], "must be a finite number"),
        (["--pag-layers", "down_blocks.7"], "matches no self-attention layer"),
        (["--cfg-scale", "3"], "CFG needs a class label"),
        (["--out", "/nonexistent-dir/x.png"], "does not exist"),
        (["--out", "x.jpg"], "must end in .png or .npz"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path: Path, weights: Path, args: list[str], message: str) -> None:
    base = ["sample", "--weights", str(weights), "--n", "1", "--steps", "2"]
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "o.png")]
    code, output = run(*base, *args)
    assert code != 0
    assert message in output
    assert not (tmp_path / "o.png").exists()
    assert "Traceback" not in output


def test_corrupt_weights(tmp_path: Path, weights: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(weights.read_bytes()[:1000])
    code, output = run("sample", "--weights", str(bad), "--n", "1", "--out", str(tmp_path / "o.png"))
    assert code != 0 and "truncated or corrupt" in output
    assert not (tmp_path / "o.png").exists()


def test_unwritable_output(tmp_path: Path, weights: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, output = run("sample", "--weights", str(weights), "--n", "1", "--steps", "2", "--out", str(ro / "o.png"))
    import os

    if os.geteuid() == 0:  # root may write anywhere; the check must at least not crash
        assert code == 0 or "permission denied" in output
    else:
        assert code != 0 and "permission denied" in output


def test_train_and_resume_are_deterministic(tmp_path: Path) -> None:
    from pagkit.train.denoiser import TrainConfig, train_denoiser
    from pagkit.weights import load_tensors
    from tiny import tiny_denoiser_config

    data = write_idx_dataset(tmp_path / "data", n_train=64, n_test=8)
    cfg = TrainConfig(epochs=1, batch_size=16, checkpoint_every=2, bf16=False)
    train_denoiser(tmp_path / "a", tiny_denoiser_config(), cfg, data_dir=data)
    train_denoiser(tmp_path / "b", tiny_denoiser_config(), cfg, data_dir=data, max_steps=2)
    train_denoiser(tmp_path / "b", tiny_denoiser_config(), cfg, data_dir=data, resume=True)
    a, meta_a = load_tensors(tmp_path / "a" / "denoiser.safetensors")
    b, meta_b = load_tensors(tmp_path / "b" / "denoiser.safetensors")
    assert meta_a["step"] == meta_b["step"] == 4
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    log = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 2
    with pytest.raises(FileExistsError, match="--resume"):
        train_denoiser(tmp_path / "a", tiny_denoiser_config(), cfg, data_dir=data)


def test_missing_dataset_error(tmp_path: Path) -> None:
    code, output = run("train", "--out", str(tmp_path / "t"), "--data-dir", str(tmp_path / "none"), "--max-steps", "1")
    assert code != 0 and "apt-get install -y dataset-fashion-mnist" in output


def test_layers_of_a_local_diffusers_folder(tmp_path: Path) -> None:
    from tiny import tiny_unet2d_condition

    tiny_unet2d_condition().save_pretrained(tmp_path / "pipe" / "unet")
    code, output = run("layers", "--diffusers", str(tmp_path / "pipe"))
    assert code == 0, output
    assert "mid_block.attentions.0.transformer_blocks.0.attn1  [self, 4x4]" in output
    assert "attn2" not in output
    code, output = run("layers", "--diffusers", str(tmp_path / "nothing"))
    assert code != 0 and "not a folder" in output
