"""The evaluation harness: metric values on known inputs, configs, per-image seeds, resume, torchrun, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pagkit.cli import main
from pagkit.data import load_split
from pagkit.eval import features as features_mod
from pagkit.eval import reference as reference_mod
from pagkit.eval.configs import ConfigError, parse_configs
from pagkit.eval.features import ClassifierFeatures, FeatureError, TorchScriptFeatures, extract, load_feature_net
from pagkit.eval.metrics import MetricError, MetricSettings, check_sizes, compute_metrics, fid, inception_score, kid
from pagkit.eval.reference import ReferenceSetError, load_reference, reference_features
from pagkit.eval.run import EvalError, EvalSettings, run_eval, sample_key
from pagkit.generate import generate
from pagkit.models.classifier import ClassifierConfig, FashionClassifier
from pagkit.models.unet import load_denoiser
from pagkit.weights import save_tensors
from tiny import write_idx_dataset, write_tiny_denoiser

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
METRIC_KEYS = ("fid", "is_mean", "kid_mean", "precision", "recall", "density", "coverage")
SMALL = MetricSettings(kid_subsets=10)


def tiny_classifier(images: np.ndarray, seed: int = 0) -> FashionClassifier:
    """A random 4-feature classifier, its batch norms calibrated on ``images`` so its features vary."""
    torch.manual_seed(seed)
    model = FashionClassifier(ClassifierConfig(widths=(4, 4, 4), feature_dim=4))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one pass sets the statistics
    with torch.no_grad():
        model.train()(torch.from_numpy(images).float().unsqueeze(1) / 127.5 - 1)
        linear = model.body[-2]
        linear.weight.mul_(4.0)
        linear.bias.fill_(2.0)  # keep the ReLU features alive
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    reference = load_split("test", write_idx_dataset(root / "data", n_train=8, n_test=40)).images
    np.savez(root / "ref.npz", images=reference)
    clf = tiny_classifier(reference)
    save_tensors(root / "clf.safetensors", clf.state_dict(), {"classifier": clf.config.to_dict()})
    return {
        "root": root,
        "weights": write_tiny_denoiser(root / "d.safetensors"),
        "reference": root / "ref.npz",
        "classifier": root / "clf.safetensors",
    }


def inputs(files: dict[str, Path], tmp_path: Path, **over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        weights=files["weights"],
        reference=files["reference"],
        features=files["classifier"],
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    kw.update(over)
    return kw


SETTINGS = EvalSettings(n=8, steps=2, shard_size=4, batch_size=4, label_mode="uniform", metrics=SMALL)


# -- metrics on known inputs --------------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift() -> None:
    a = np.random.default_rng(0).normal(size=(300, 6))
    assert abs(fid(a, a)) < 1e-8
    # equal covariances: FID = |mu_1 - mu_2|^2 = d c^2
    assert fid(a, a + 0.5) == pytest.approx(6 * 0.25, rel=1e-9)
    assert fid(a, a + 0.1) < fid(a, a + 0.5) < fid(a, a + 2.0)
    assert fid(a, 2 * a) > 1.0  # a covariance change alone counts


def test_precision_recall_on_separable_and_matching_sets() -> None:
    rng = np.random.default_rng(1)
    real = rng.normal(size=(200, 4))
    far = compute_metrics(real, rng.normal(size=(200, 4)) + 20.0, None, SMALL)
    assert far["precision"] == far["recall"] == far["density"] == far["coverage"] == 0.0
    near = compute_metrics(real, rng.normal(size=(200, 4)), None, SMALL)
    assert near["precision"] > 0.8 and near["recall"] > 0.8 and near["coverage"] > 0.8
    # half the fake samples collapsed onto one real point: precision stays high, recall drops
    mode = np.concatenate([rng.normal(size=(100, 4)), np.repeat(real[:1], 100, 0) + 1e-3 * rng.normal(size=(100, 4))])
    collapsed = compute_metrics(real, mode, None, SMALL)
    assert collapsed["precision"] > 0.8 and collapsed["recall"] < near["recall"]


def test_inception_score_and_kid_known_values() -> None:
    confident = np.full((100, 10), -20.0)
    confident[np.arange(100), np.arange(100) % 10] = 20.0
    assert inception_score(confident, MetricSettings(is_splits=1))[0] == pytest.approx(10.0, rel=1e-6)
    one_class = np.zeros((100, 10))
    one_class[:, 3] = 20.0
    assert inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    assert abs(kid(a, b, SMALL)[0]) < 0.05  # same distribution (unbiased MMD: about 0, either sign)
    assert kid(a, a + 3.0, SMALL)[0] > 1.0
    assert kid(a, a + 3.0, SMALL) == kid(a, a + 3.0, SMALL)  # seeded subsets


def test_fewer_samples_than_feature_dims_is_an_error() -> None:
    with pytest.raises(MetricError, match="FID is undefined"):
        check_sizes(100, 5000, 128)
    with pytest.raises(MetricError, match="k = 5"):
        check_sizes(5, 10, 2)


# -- configs ------------------------------------------------------------------------------------------------------


def test_config_strings_map_to_generate_arguments() -> None:
    configs = parse_configs("none,pag:3,sag:0.8,cfg:2,cfg:2+pag:3,pag:1.5@down.2,pag:3/blur,pag:3@[down.2,mid]~linear")
    by_name = {c.name: c.generate_kwargs() for c in configs}
    assert by_name["none"]["pag_scale"] == 0.0 and by_name["none"]["cfg_scale"] == 1.0
    assert by_name["pag:3"]["pag_scale"] == 3.0 and by_name["pag:3"]["pag_layers"] == "mid"
    assert by_name["sag:0.8"]["sag_scale"] == 0.8 and by_name["sag:0.8"]["pag_scale"] == 0.0
    assert (by_name["cfg:2+pag:3"]["cfg_scale"], by_name["cfg:2+pag:3"]["pag_scale"]) == (2.0, 3.0)
    assert by_name["pag:1.5@down.2"]["pag_layers"] == "down.2"
    assert by_name["pag:3/blur"]["perturbation"] == "blur"
    assert by_name["pag:3@[down.2,mid]~linear"]["pag_layers"] == "down.2,mid"
    assert by_name["pag:3@[down.2,mid]~linear"]["pag_schedule"] == "linear"
    assert parse_configs("pag:3%2")[0].reuse_delta == 2
    assert set(by_name["none"]) <= set(generate.__kwdefaults__)


def test_config_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'configs = ["none", "pag:3"]\n'
        '[[config]]\nname = "half"\npag = { scale = 2, layers = ["down.2", "mid"], schedule = "interval:0:0.5" }\n'
        "[[config]]\ncfg = 2\nsag = { scale = 0.5 }\n"
    )
    configs = parse_configs(str(path))
    assert [c.name for c in configs] == ["none", "pag:3", "half", "cfg:2+sag:0.5"]
    assert configs[2].pag_layers == "down.2,mid" and configs[2].pag_schedule == "interval:0:0.5"
    path.write_text("[[config]]\npag = { scale = 2, layer = 'mid' }\n")
    with pytest.raises(ConfigError, match="pag takes"):
        parse_configs(str(path))


@pytest.mark.parametrize(
    "spec,match",
    [
        ("none,foo:3", "unknown guidance 'foo'"),
        ("pag", "give pag's scale"),
        ("pag:x", "must be a number"),
        ("pag:3/zzz", "unknown perturbation"),
        ("cfg:2/x", "takes no options"),  # schedules apply to every term in the spec syntax (sag:1~linear)
        ("pag:3,pag:3", "duplicate"),
        ("pag:3+pag:1", "given twice"),
        ("missing.toml", "not found"),
    ],
)
def test_bad_configs(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_configs(spec)


# -- features and reference ---------------------------------------------------------------------------------------


def test_reference_loading_and_shape_errors(tmp_path: Path, files: dict[str, Path]) -> None:
    images, _ = load_reference(files["reference"])
    assert images.shape == (40, 28, 28) and images.dtype == np.uint8
    np.savez(tmp_path / "bad.npz", images=np.zeros((10, 32, 32), np.uint8))
    with pytest.raises(ReferenceSetError, match=r"\[N, 28, 28\]"):
        load_reference(tmp_path / "bad.npz")
    np.savez(tmp_path / "float.npz", images=np.zeros((10, 28, 28), np.float32))
    with pytest.raises(ReferenceSetError, match="uint8"):
        load_reference(tmp_path / "float.npz")
    from PIL import Image

    (tmp_path / "pngs").mkdir()
    for i in range(3):
        Image.fromarray(images[i]).save(tmp_path / "pngs" / f"{i}.png")
    assert np.array_equal(load_reference(tmp_path / "pngs")[0], images[:3])
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(tmp_path / "pngs" / "9.png")
    with pytest.raises(ReferenceSetError, match="expected 28x28"):
        load_reference(tmp_path / "pngs")


def test_reference_features_are_cached(tmp_path: Path, files: dict[str, Path], monkeypatch: Any) -> None:
    net = load_feature_net(files["classifier"])
    images, _ = load_reference(files["reference"])
    first, path = reference_features(images, net, tmp_path, progress=False)
    assert path is not None and path.is_file() and first.shape == (40, 4) and first.std(0).min() > 0

    def no_extract(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(reference_mod, "extract", no_extract)
    again, _ = reference_features(images, net, tmp_path, progress=False)
    assert np.array_equal(first, again)


class _Pool(torch.nn.Module):
    def __init__(self, flat: bool = True) -> None:
        super().__init__()
        self.flat = flat
        self.proj = torch.nn.Conv2d(3, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4))
        return y.mean((2, 3)) if self.flat else y.flatten(2)


def test_torchscript_features_and_output_mismatch(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.jit.script(_Pool()).save(str(good))
    torch.jit.script(_Pool(flat=False)).save(str(bad))
    net = load_feature_net(good)
    assert isinstance(net, TorchScriptFeatures) and features_mod.probe(net) == 5
    out = extract(net, np.zeros((3, 28, 28), np.uint8), progress=False)
    assert out.shape == (3, 5)
    with pytest.raises(FeatureError, match="expected"):
        features_mod.probe(load_feature_net(bad))
    (tmp_path / "junk.pt").write_bytes(b"not a torchscript file")
    with pytest.raises(FeatureError, match="not a TorchScript file"):
        load_feature_net(tmp_path / "junk.pt")
    with pytest.raises(FeatureError, match="unknown feature network"):
        load_feature_net("inception")


# -- sampling: per-image seeds, shards, resume --------------------------------------------------------------------


def test_shards_equal_one_call_and_batch_size_does_not_matter(tmp_path: Path, files: dict[str, Path]) -> None:
    model = load_denoiser(files["weights"])
    labels = np.arange(6) % 10
    kw = dict(steps=2, seed=5, pag_scale=1.0, sag_scale=0.5, model=model, progress=False)
    whole, _ = generate(6, labels=labels, batch_size=3, **kw)
    parts = [generate(3, labels=labels[s : s + 3], first_index=s, batch_size=3, **kw)[0] for s in (0, 3)]
    assert np.array_equal(whole, np.concatenate(parts))
    other, _ = generate(6, labels=labels, batch_size=2, **kw)
    assert np.abs(whole.astype(int) - other.astype(int)).max() <= 1
    a = run_eval(parse_configs("pag:1"), tmp_path / "a", SETTINGS, **inputs(files, tmp_path))
    b = run_eval(
        parse_configs("pag:1"),
        tmp_path / "b",
        EvalSettings(**{**SETTINGS.__dict__, "batch_size": 3}),
        **inputs(files, tmp_path),
    )
    assert a is not None and b is not None
    for key in METRIC_KEYS:
        assert a["configs"][0][key] == pytest.approx(b["configs"][0][key], rel=0.05, abs=0.02)


class Killed(Exception):
    pass


def test_killed_run_resumes_without_recomputing_shards(tmp_path: Path, files: dict[str, Path]) -> None:
    configs = parse_configs("none,pag:1")
    out = tmp_path / "run"

    def kill(config: Any, index: int, path: Path) -> None:
        raise Killed

    with pytest.raises(Killed):
        run_eval(configs, out, SETTINGS, on_shard=kill, **inputs(files, tmp_path))
    shards = sorted(out.glob("samples/*/shard-*.npz"))
    assert len(shards) == 1 and not list(out.glob("samples/*/.*.tmp"))
    stamp = shards[0].stat().st_mtime_ns
    written: list[tuple[str, int]] = []
    results = run_eval(
        configs, out, SETTINGS, on_shard=lambda c, i, p: written.append((c.name, i)), **inputs(files, tmp_path)
    )
    assert shards[0].stat().st_mtime_ns == stamp
    assert len(written) == 3 and ("none", 0) not in written
    assert len(list(out.glob("samples/*/shard-*.npz"))) == 4
    # a third call samples nothing, and the numbers equal an uninterrupted run
    written.clear()
    again = run_eval(
        configs, out, SETTINGS, on_shard=lambda c, i, p: written.append((c.name, i)), **inputs(files, tmp_path)
    )
    fresh = run_eval(configs, tmp_path / "fresh", SETTINGS, **inputs(files, tmp_path))
    assert written == []
    assert results is not None and again is not None and fresh is not None
    for r in (again, fresh):
        assert [row["fid"] for row in r["configs"]] == [row["fid"] for row in results["configs"]]
    assert (out / "results.md").read_text().count("| `") == 2
    for name in ("plots/fid_is_vs_scale.png", "plots/precision_recall.png", "grids/none.png", "grids/pag_1.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_torchrun_two_processes_give_the_same_metrics(tmp_path: Path, files: dict[str, Path]) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this python")
    args = [
        "eval", "--configs", "none,sag:0.5", "--num-images", "8", "--steps", "2",
        "--shard-size", "2", "--batch-size", "2",
        "--weights", str(files["weights"]), "--reference", str(files["reference"]),
        "--features", str(files["classifier"]), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "pagkit",
            *args,
            "--out",
            str(tmp_path / "dist"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    single = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    dist = json.loads((tmp_path / "dist" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    for a, b in zip(dist["configs"], one["configs"], strict=True):
        assert a["name"] == b["name"]
        assert a["n"] == b["n"] == 8
        for key in METRIC_KEYS:
            assert a[key] == b[key], (a["name"], key)
    # the shards really were split: shard i sampled by rank i % 2
    for path in (tmp_path / "dist" / "samples").glob("*/shard-*.npz"):
        assert int(np.load(path)["rank"]) == int(path.stem.split("-")[1]) % 2


# -- clear errors before any long work ----------------------------------------------------------------------------


def _fails_early(files: dict[str, Path], tmp_path: Path, args: list[str], match: str) -> None:
    out = tmp_path / "out"
    base = ["eval", "--n", "8", "--steps", "2", "--weights", str(files["weights"]), "--no-progress"]
    base += ["--reference", str(files["reference"]), "--features", str(files["classifier"]), "--out", str(out)]
    result = CliRunner().invoke(main, [*base, *args])
    assert result.exit_code == 2, result.output
    assert match in result.output, result.output
    assert not (out / "samples").exists()


def test_bad_inputs_fail_before_sampling(tmp_path: Path, files: dict[str, Path]) -> None:
    np.savez(tmp_path / "rgb.npz", images=np.zeros((40, 28, 28, 3), np.uint8))
    bad_net = tmp_path / "bad.pt"
    torch.jit.script(_Pool(flat=False)).save(str(bad_net))
    _fails_early(files, tmp_path, ["--configs", "none,bogus:2"], "unknown guidance 'bogus'")
    _fails_early(files, tmp_path, ["--configs", "none", "--reference", str(tmp_path / "rgb.npz")], "[N, 28, 28]")
    _fails_early(files, tmp_path, ["--configs", "none", "--features", str(bad_net)], "expected [2, d]")
    _fails_early(files, tmp_path, ["--configs", "none", "--n", "3"], "FID is")
    _fails_early(files, tmp_path, ["--configs", "cfg:2"], "--label-mode uniform")
    _fails_early(files, tmp_path, ["--configs", "pag:2@down.0"], "matches no self-attention")
    _fails_early(files, tmp_path, ["--configs", "none", "--steps", "1001"], "exceeds the model's 1000 training steps")
    _fails_early(
        files, tmp_path, ["--configs", "none", "--reference", "test", "--data-dir", str(tmp_path)], "--data-dir"
    )
    with pytest.raises(EvalError, match="shard_size"):
        run_eval(parse_configs("none"), tmp_path / "x", EvalSettings(shard_size=0), **inputs(files, tmp_path))
    with pytest.raises(ValueError, match="unknown precision"):
        run_eval(parse_configs("none"), tmp_path / "x", EvalSettings(precision="fp16"), **inputs(files, tmp_path))
    with pytest.raises(EvalError, match="device 'cuda:99' is not available"):
        run_eval(parse_configs("none"), tmp_path / "x", EvalSettings(device="cuda:99"), **inputs(files, tmp_path))


def test_precision_and_device_are_part_of_the_sample_key() -> None:
    config = parse_configs("pag:2")[0]
    keys = {sample_key(config, EvalSettings(precision=p), "m") for p in ("fp32", "bf16")}
    assert len(keys) == 2
    cpu, cuda = (sample_key(config, EvalSettings(device=d), "m") for d in ("cpu", "cuda"))
    assert cpu != cuda
    assert sample_key(config, EvalSettings(device="cuda:1"), "m") == cuda  # the GPU's index does not matter


def test_is_uses_classifier_logits(files: dict[str, Path]) -> None:
    net = load_feature_net(files["classifier"])
    assert isinstance(net, ClassifierFeatures)
    logits = extract(net, np.zeros((2, 28, 28), np.uint8), progress=False, logits=True)
    assert logits.shape == (2, 10)


def test_reference_split_from_data_dir(tmp_path: Path, files: dict[str, Path]) -> None:
    """--reference test reads the split from --data-dir (the option the dataset error message names)."""
    args = ["eval", "--configs", "none", "--n", "8", "--steps", "2", "--shard-size", "4", "--batch-size", "4"]
    args += ["--weights", str(files["weights"]), "--features", str(files["classifier"]), "--no-progress"]
    args += ["--reference", "test", "--data-dir", str(files["root"] / "data"), "--cache-dir", str(tmp_path / "c")]
    result = CliRunner().invoke(main, [*args, "--threads", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "results.json").read_text())["reference"]["name"] == "fashion-mnist:test"
