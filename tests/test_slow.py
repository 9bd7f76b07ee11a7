"""Long checks on the shipped model and the real dataset (``.venv/bin/python -m pytest -m slow``; minutes on a
2-core CPU): the rounding bound of the batch-size guarantee, a killed ``pagkit sample`` of real size resumed, a
damaged evaluation resumed against the real reference set, training resumed on the real data, the demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pagkit.cli import main
from pagkit.data import DEFAULT_DIR, data_dir

pytestmark = pytest.mark.slow
needs_dataset = pytest.mark.skipif(
    not (data_dir() / "t10k-images-idx3-ubyte.gz").exists() and not (DEFAULT_DIR / "t10k-images-idx3-ubyte").exists(),
    reason="Fashion-MNIST not installed (make dataset)",
)


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.fixture
def threads() -> Any:
    yield
    torch.set_num_threads(1)


def test_batch_size_and_threads_change_pixels_by_rounding_only(threads: None) -> None:
    """The embedded model, 32 images, 20 DDIM steps, PAG s = 2: batch sizes 1, 5, 32 and 1 or 2 threads differ
    from one another by at most one grey level, in fewer than 0.1% of the pixels."""
    from pagkit.generate import generate
    from pagkit.models.unet import load_denoiser

    model = load_denoiser()
    results = {}
    for n_threads in (1, 2):
        torch.set_num_threads(n_threads)
        for batch in (1, 5, 32):
            results[n_threads, batch], _ = generate(32, steps=20, batch_size=batch, model=model, progress=False)
    reference = results[1, 32].astype(int)
    for key, images in results.items():
        diff = np.abs(images.astype(int) - reference)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (key, diff.max(), (diff > 0).mean())


class Killed(Exception):
    pass


def test_killed_sample_of_real_size_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: None
) -> None:
    import pagkit.generate

    args = ["sample", "--n", "1100", "--steps", "3", "--threads", "2", "--no-progress"]
    code, output = run(*args, "--out", str(tmp_path / "whole.npz"))
    assert code == 0, output
    real = pagkit.generate.generate
    starts: list[int] = []

    def killed_at_the_second_part(count: int, **kw: Any) -> Any:
        starts.append(kw["first_index"])
        if len(starts) == 2:
            raise Killed
        return real(count, **kw)

    monkeypatch.setattr(pagkit.generate, "generate", killed_at_the_second_part)
    out = tmp_path / "cut.npz"
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert isinstance(result.exception, Killed)
    assert [p.name for p in (tmp_path / "cut.npz.parts").glob("part-*.npz")] == ["part-00000.npz"]
    monkeypatch.setattr(pagkit.generate, "generate", real)
    code, output = run(*args, "--out", str(out))
    assert code == 0, output
    whole, cut = np.load(tmp_path / "whole.npz"), np.load(out)
    assert cut["images"].shape == (1100, 28, 28)
    assert np.array_equal(whole["images"], cut["images"]) and np.array_equal(whole["labels"], cut["labels"])


@needs_dataset
def test_eval_against_the_real_reference_resumes_after_damage(tmp_path: Path, threads: None) -> None:
    args = ["eval", "--configs", "none,pag:2", "--n", "256", "--steps", "4", "--shard-size", "128"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--no-progress", "--threads", "2"]
    code, output = run(*args, "--out", str(tmp_path / "run"))
    assert code == 0, output
    before = json.loads((tmp_path / "run" / "results.json").read_text())["configs"]
    shard = sorted((tmp_path / "run").glob("samples/*/shard-00001.npz"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    cache = sorted((tmp_path / "cache").glob("ref-*.npz"))[0]
    raw = bytearray(cache.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    cache.write_bytes(bytes(raw))
    code, output = run(*args, "--out", str(tmp_path / "run"))
    assert code == 0, output
    after = json.loads((tmp_path / "run" / "results.json").read_text())["configs"]
    keys = ("fid", "is_mean", "kid_mean", "precision", "recall", "density", "coverage")
    assert [[r[k] for k in keys] for r in before] == [[r[k] for k in keys] for r in after]


@needs_dataset
def test_training_on_the_real_data_resumes_exactly(tmp_path: Path, threads: None) -> None:
    from pagkit.weights import load_tensors

    base = ["train", "--batch-size", "32", "--epochs", "0.004", "--threads", "2", "--no-progress"]
    code, output = run(*base, "--out", str(tmp_path / "whole"))
    assert code == 0, output
    assert run(*base, "--max-steps", "3", "--out", str(tmp_path / "cut"))[0] == 0
    code, output = run(*base, "--resume", "--out", str(tmp_path / "cut"))
    assert code == 0, output
    a, meta_a = load_tensors(tmp_path / "whole" / "denoiser.safetensors")
    b, meta_b = load_tensors(tmp_path / "cut" / "denoiser.safetensors")
    assert meta_a["step"] == meta_b["step"] == 8
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_demo_with_its_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: None) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = run("demo", "--threads", "2")
    assert code == 0, output
    from PIL import Image

    with Image.open(tmp_path / "demo.png") as img:
        assert img.size[0] > img.size[1] > 100
