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
        (["--steps", "-1"], "Invalid value for '--steps'"),
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


# -- output checks before any sampling ----------------------------------------------------------------------------


def test_more_bad_input_fails_before_sampling(tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pagkit.generate
    import pagkit.store

    def no_sampling(*args: object, **kwargs: object) -> None:
        raise AssertionError("sampled before checking the input")

    monkeypatch.setattr(pagkit.generate, "generate", no_sampling)
    (tmp_path / "x.png").mkdir()
    base = ["sample", "--weights", str(weights), "--steps", "2"]
    cases = [
        (["--pag-layers", "", "--out", str(tmp_path / "o.png")], "--pag-layers is empty"),
        (["--sag-layer", " ", "--out", str(tmp_path / "o.png")], "--sag-layer is empty"),
        (["--out", str(tmp_path / "x.png")], "it is a folder"),
        (["--n", str(2**24 + 1), "--out", str(tmp_path / "o.npz")], "Invalid value for '--n'"),
        (["--n", "20000", "--out", str(tmp_path / "o.png")], "a PNG grid holds at most 10,000 images"),
        (["--steps", "5000", "--out", str(tmp_path / "o.png")], "exceeds the model's 1000 training steps"),
        (["--device", "cuda:99", "--out", str(tmp_path / "o.png")], "device 'cuda:99' is not available"),
    ]
    for args, message in cases:
        code, output = run(*base, *args)
        assert code == 2 and message in output and "Traceback" not in output, (args, output)
    monkeypatch.setattr(pagkit.store, "free_bytes", lambda folder: 10_000)
    code, output = run(*base, "--n", "16000000", "--out", str(tmp_path / "o.npz"))
    assert code == 2 and "of disk space" in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_generate_refuses_what_memory_cannot_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    import pagkit.store
    from pagkit.generate import generate

    monkeypatch.setattr(pagkit.store, "available_memory", lambda: 1 << 20)
    with pytest.raises(ValueError, match=r"needs .* of memory"):
        generate(10_000_000, steps=1, weights="never-loaded.safetensors", progress=False)


def test_error_starts_on_its_own_line_after_a_progress_bar(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pagkit.generate

    def fail(*args: object, **kwargs: object) -> None:
        raise ValueError("boom")

    monkeypatch.setattr(pagkit.generate, "sample", fail)
    code, output = run(
        "sample", "--weights", str(weights), "--n", "2", "--steps", "2", "--out", str(tmp_path / "o.png")
    )
    assert code == 2
    assert "sampling" in output  # the bar was drawn
    assert "\nerror: boom" in output, repr(output)
    assert not (tmp_path / "o.png.parts").exists()


# -- pagkit sample writes as it goes ------------------------------------------------------------------------------


class Killed(Exception):
    pass


def _sample_args(weights: Path, out: Path, n: int = 5) -> list[str]:
    return ["sample", "--weights", str(weights), "--n", str(n), "--steps", "2", "--batch-size", "1"]


def test_killed_sample_keeps_its_parts_and_resumes_exactly(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pagkit.generate
    import pagkit.parts
    from pagkit.store import save_arrays

    monkeypatch.setattr(pagkit.parts, "PART_IMAGES", 2)  # parts of 2 images: 5 images make 3 parts
    real = pagkit.generate.generate
    calls: list[int] = []

    def generate(count: int, **kw: object) -> object:
        calls.append(int(kw["first_index"]))  # type: ignore[call-overload]
        if kill_at is not None and len(calls) == kill_at:
            raise Killed
        return real(count, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(pagkit.generate, "generate", generate)
    kill_at: int | None = None
    fresh = tmp_path / "fresh.npz"
    code, output = run(*_sample_args(weights, fresh), "--out", str(fresh))
    assert code == 0, output
    assert not (tmp_path / "fresh.npz.parts").exists() and calls == [0, 2, 4]
    expected = np.load(fresh)

    out = tmp_path / "o.npz"
    parts = tmp_path / "o.npz.parts"
    for damage in ("none", "truncate", "flip", "drop-key", "wrong-dtype"):
        calls.clear()
        kill_at = 3
        result = CliRunner().invoke(main, [*_sample_args(weights, out), "--out", str(out)])
        assert isinstance(result.exception, Killed)
        assert sorted(p.name for p in parts.glob("part-*.npz")) == ["part-00000.npz", "part-00001.npz"]
        assert not out.exists()
        first = parts / "part-00000.npz"
        if damage == "truncate":
            first.write_bytes(first.read_bytes()[:300])
        elif damage == "flip":
            raw = bytearray(first.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            first.write_bytes(bytes(raw))
        elif damage in ("drop-key", "wrong-dtype"):
            arrays = dict(np.load(first))
            arrays.pop("checksum")
            if damage == "drop-key":
                arrays.pop("labels")
                save_arrays(first, arrays)  # a valid checksum, a key missing
            else:
                arrays["images"] = arrays["images"].astype(np.float32)
                save_arrays(first, arrays)
        calls.clear()
        kill_at = None
        code, output = run(*_sample_args(weights, out), "--out", str(out))
        assert code == 0, output
        assert calls == ([4] if damage == "none" else [0, 4]), (damage, calls)
        if damage != "none":
            assert "part-00000.npz is damaged" in output and "set aside" in output, output
        got = np.load(out)
        assert np.array_equal(got["images"], expected["images"]), damage
        assert np.array_equal(got["labels"], expected["labels"]) and got["labels"].dtype == np.int64
        assert not parts.exists()
        out.unlink()


def test_sample_parts_of_other_settings_are_discarded(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pagkit.parts

    monkeypatch.setattr(pagkit.parts, "PART_IMAGES", 2)
    out = tmp_path / "o.npz"
    parts = pagkit.parts.SampleParts(out, {"seed": 99}, 4, 2)
    parts.write(parts.parts[0], np.zeros((2, 28, 28), np.uint8), np.full(2, -1, np.int64))
    code, output = run(*_sample_args(weights, out, n=4), "--out", str(out))
    assert code == 0 and "other settings" in output, output
    fresh = tmp_path / "fresh.npz"
    assert run(*_sample_args(weights, fresh, n=4), "--out", str(fresh))[0] == 0
    assert np.array_equal(np.load(out)["images"], np.load(fresh)["images"])


def test_same_images_whatever_the_batch_size_up_to_rounding(weights: Path) -> None:
    """The stated guarantee (pagkit.generate.generate): bit-exact when cut at multiples of the batch size; across
    batch sizes, float rounding only (at most one grey level, in a small share of the pixels)."""
    from pagkit.generate import generate
    from pagkit.models.unet import load_denoiser

    model = load_denoiser(weights)
    kw = dict(steps=3, seed=4, pag_scale=2.0, model=model, progress=False)
    whole, _ = generate(12, batch_size=4, **kw)
    pieces = [generate(4, first_index=s, batch_size=4, **kw)[0] for s in (0, 4, 8)]
    assert np.array_equal(whole, np.concatenate(pieces))
    assert np.array_equal(whole, generate(12, batch_size=4, **kw)[0])
    for batch in (1, 3, 5, 12):
        other, _ = generate(12, batch_size=batch, **kw)
        diff = np.abs(other.astype(int) - whole.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (batch, diff.max(), (diff > 0).mean())


# -- other commands -----------------------------------------------------------------------------------------------


def test_failed_train_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "t"
    code, output = run("train", "--out", str(out), "--data-dir", str(tmp_path / "none"), "--max-steps", "1")
    assert code == 2 and "apt-get install" in output
    assert not out.exists()


def test_train_classifier_max_steps(tmp_path: Path) -> None:
    data = write_idx_dataset(tmp_path / "data", n_train=256, n_test=16)
    out = tmp_path / "c.safetensors"
    args = ["train-classifier", "--out", str(out), "--epochs", "3", "--max-steps", "1", "--no-progress"]
    code, output = run(*args, "--data-dir", str(data), "--threads", "1")
    assert code == 0, output
    from pagkit.weights import load_tensors

    _, meta = load_tensors(out)
    assert meta["steps"] == 1


def test_demo_works_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = run("demo", "--n", "1", "--steps", "1", "--threads", "1")
    assert code == 0, output
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert "unguided" in output and "PAG s=2" in output  # each panel's bar says which it is
