"""Every file a run reads back is checked (format, keys, dtypes, shapes, a checksum written with it): a damaged
shard is set aside and resampled, a damaged cache recomputed, a damaged file the user gave is a one-line error;
reruns after damage give exactly the results of an undamaged run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pagkit.cli import main
from pagkit.data import load_split
from pagkit.eval.configs import parse_configs
from pagkit.eval.metrics import MetricSettings
from pagkit.eval.run import EvalSettings, run_eval
from pagkit.store import DamagedFile, load_arrays, save_arrays
from pagkit.weights import WeightsError, load_tensors, save_tensors
from tiny import write_idx_dataset, write_tiny_denoiser

SETTINGS = EvalSettings(
    n=8, steps=2, shard_size=4, batch_size=4, label_mode="uniform", metrics=MetricSettings(kid_subsets=10)
)
METRICS = ("fid", "is_mean", "kid_mean", "precision", "recall", "density", "coverage")
SPEC = {"images": ("uint8", (None, 28, 28)), "labels": ("int64", (None,))}


# -- the four kinds of damage -------------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + 8):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def _rewrite(path: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Change the arrays and write a file that is valid in format, with a checksum that matches it."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "checksum"}
    change(arrays)
    save_arrays(path, arrays)


def drop_key(path: Path) -> None:
    _rewrite(path, lambda a: a.pop(sorted(a)[0]))


def wrong_dtype(path: Path) -> None:
    def change(arrays: dict[str, np.ndarray]) -> None:
        key = "images" if "images" in arrays else "features"
        arrays[key] = arrays[key].astype(np.float64)

    _rewrite(path, change)


DAMAGE = {"truncate": truncate, "flip-bytes": flip_bytes, "drop-key": drop_key, "wrong-dtype": wrong_dtype}


def test_store_detects_every_damage(tmp_path: Path) -> None:
    path = tmp_path / "a.npz"
    arrays = {"images": np.arange(2 * 784, dtype=np.uint8).reshape(2, 28, 28), "labels": np.array([3, -1])}
    for name, damage in DAMAGE.items():
        save_arrays(path, arrays)
        assert all(np.array_equal(v, arrays[k]) for k, v in load_arrays(path, SPEC).items())
        damage(path)
        with pytest.raises(DamagedFile):
            load_arrays(path, SPEC)
        assert name
    # valid format, wrong content: the checksum is that of other arrays
    save_arrays(path, arrays)
    with np.load(path) as data:
        stored = {k: data[k] for k in data.files}
    stored["images"] = stored["images"][::-1].copy()
    np.savez(path, **stored)
    with pytest.raises(DamagedFile, match="checksum"):
        load_arrays(path, SPEC)
    np.savez(path, **arrays)  # no checksum at all
    with pytest.raises(DamagedFile, match="no checksum"):
        load_arrays(path, SPEC)
    path.write_bytes(b"\x93NUMPY pickled?")
    with pytest.raises(DamagedFile, match="unreadable"):
        load_arrays(path, SPEC)


# -- evaluation: shards, feature caches, reference cache -----------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from test_eval import tiny_classifier

    root = tmp_path_factory.mktemp("files")
    reference = load_split("test", write_idx_dataset(root / "data", n_train=8, n_test=40)).images
    np.savez(root / "ref.npz", images=reference)
    clf = tiny_classifier(reference)
    save_tensors(root / "clf.safetensors", clf.state_dict(), {"classifier": clf.config.to_dict()})
    return {
        "weights": write_tiny_denoiser(root / "d.safetensors"),
        "reference": root / "ref.npz",
        "classifier": root / "clf.safetensors",
    }


def _inputs(files: dict[str, Path], cache: Path) -> dict[str, Any]:
    return dict(
        weights=files["weights"],
        reference=files["reference"],
        features=files["classifier"],
        cache_dir=cache,
        progress=False,
    )


def _metrics(results: dict[str, Any] | None) -> list[list[float]]:
    assert results is not None
    return [[row[k] for k in METRICS] for row in results["configs"]]


@pytest.mark.parametrize("target", ["shard", "config-features", "reference-features"])
def test_eval_reruns_after_damage_give_the_undamaged_results(
    tmp_path: Path, files: dict[str, Path], target: str, capfd: pytest.CaptureFixture[str]
) -> None:
    configs = parse_configs("none,pag:1")
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    undamaged = _metrics(run_eval(configs, out, SETTINGS, **_inputs(files, cache)))
    capfd.readouterr()
    for name, damage in DAMAGE.items():
        if target == "shard":
            victim = sorted(out.glob("samples/*/shard-00001.npz"))[0]
        elif target == "config-features":
            victim = sorted(p for p in out.glob("samples/*/*.npz") if not p.name.startswith("shard-"))[0]
        else:
            victim = sorted(cache.glob("ref-*.npz"))[0]
        damage(victim)
        resampled: list[tuple[str, int]] = []
        rerun = run_eval(
            configs,
            out,
            SETTINGS,
            on_shard=lambda c, i, p, seen=resampled: seen.append((c.name, i)),
            **_inputs(files, cache),
        )
        assert _metrics(rerun) == undamaged, (target, name)
        err = capfd.readouterr().err
        assert f"{victim} is damaged" in err, (target, name, err)
        if target == "shard":
            assert len(resampled) == 1 and resampled[0][1] == 1, resampled
            assert victim.is_file() and list(victim.parent.glob(victim.name + ".damaged*"))  # set aside, redone
            for stale in victim.parent.glob("*.damaged*"):
                stale.unlink()
        else:
            assert resampled == []
        assert len(list(out.glob("samples/*/shard-*.npz"))) == 4


def test_shard_with_valid_format_but_wrong_content_is_resampled(tmp_path: Path, files: dict[str, Path]) -> None:
    configs = parse_configs("none")
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    undamaged = _metrics(run_eval(configs, out, SETTINGS, **_inputs(files, cache)))
    shard = sorted(out.glob("samples/*/shard-00000.npz"))[0]

    def swap_labels(arrays: dict[str, np.ndarray]) -> None:
        arrays["labels"] = arrays["labels"][::-1].copy()  # checksum fine, labels not those of the label mode

    _rewrite(shard, swap_labels)
    resampled: list[int] = []
    again = run_eval(configs, out, SETTINGS, on_shard=lambda c, i, p: resampled.append(i), **_inputs(files, cache))
    assert resampled == [0] and _metrics(again) == undamaged


def test_damaged_reference_is_a_one_line_error(tmp_path: Path, files: dict[str, Path]) -> None:
    bad = tmp_path / "ref.npz"
    bad.write_bytes(files["reference"].read_bytes()[:500])
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    (pngs / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    for reference, message in ((bad, "truncated or corrupt"), (pngs, "cannot be read")):
        args = ["eval", "--configs", "none", "--n", "8", "--steps", "2", "--no-progress", "--threads", "1"]
        args += ["--weights", str(files["weights"]), "--features", str(files["classifier"])]
        result = CliRunner().invoke(main, [*args, "--reference", str(reference), "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


# -- weights and training checkpoints ------------------------------------------------------------------------------


def test_damaged_or_poisoned_weights_are_one_line_errors(tmp_path: Path, files: dict[str, Path]) -> None:
    tensors, meta = load_tensors(files["weights"])
    cases = {}
    cases["truncated"] = files["weights"].read_bytes()[:-1000]
    raw = bytearray(files["weights"].read_bytes())
    raw[-5000] ^= 0xFF  # a weight's bytes: the safetensors format stays valid, the checksum does not
    cases["flipped"] = bytes(raw)
    poisoned = dict(tensors)
    key = sorted(k for k in tensors if tensors[k].is_floating_point())[0]
    poisoned[key] = poisoned[key].clone()
    poisoned[key].view(-1)[0] = float("nan")
    save_tensors(tmp_path / "nan.safetensors", poisoned, meta)
    cases["nan"] = (tmp_path / "nan.safetensors").read_bytes()
    messages = {"truncated": "truncated or corrupt", "flipped": "do not match the checksum", "nan": "NaN"}
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(WeightsError, match=messages[name]):
            load_tensors(path)
        out = tmp_path / "o.png"
        result = CliRunner().invoke(main, ["sample", "--weights", str(path), "--n", "1", "--out", str(out)])
        assert result.exit_code == 2 and messages[name] in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()


class Killed(Exception):
    pass


def test_checkpoints_survive_a_kill_between_their_two_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pagkit.train.checkpoint as ckpt
    from pagkit.train.denoiser import TrainConfig, train_denoiser
    from tiny import tiny_denoiser_config

    data = write_idx_dataset(tmp_path / "data", n_train=64, n_test=8)
    cfg = TrainConfig(epochs=1.5, batch_size=16, checkpoint_every=2, bf16=False)
    kw: dict[str, Any] = dict(config=tiny_denoiser_config(), train=cfg, data_dir=data, progress=False)
    train_denoiser(tmp_path / "whole", **kw)

    real = ckpt.save_tensors
    saves: list[Path] = []

    def killed_after_the_optimizer_file(path: Any, tensors: Any, meta: Any = None) -> None:
        real(path, tensors, meta)
        saves.append(Path(path))
        if len(saves) == 3:  # the second checkpoint's optimizer file is written, its model file is not
            raise Killed

    monkeypatch.setattr(ckpt, "save_tensors", killed_after_the_optimizer_file)
    with pytest.raises(Killed):
        train_denoiser(tmp_path / "cut", **kw)
    monkeypatch.setattr(ckpt, "save_tensors", real)
    assert (tmp_path / "cut" / "checkpoint-optimizer.safetensors.next").is_file()
    train_denoiser(tmp_path / "cut", resume=True, **kw)
    a, _ = load_tensors(tmp_path / "whole" / "denoiser.safetensors")
    b, meta = load_tensors(tmp_path / "cut" / "denoiser.safetensors")
    assert meta["step"] == 6 and all(torch.equal(a[k], b[k]) for k in a)

    # a damaged checkpoint is a one-line error on --resume
    ck = tmp_path / "cut" / "checkpoint.safetensors"
    raw = bytearray(ck.read_bytes())
    raw[-100] ^= 0xFF
    ck.write_bytes(bytes(raw))
    result = CliRunner().invoke(
        main,
        ["train", "--out", str(tmp_path / "cut"), "--resume", "--batch-size", "16", "--data-dir", str(data)],
    )
    assert result.exit_code == 2 and "checksum" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
