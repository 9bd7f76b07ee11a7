"""Inverse problems: operators vs direct computations, the DPS gradient path, bad input, ``pagkit restore``,
metrics and the latent-pipeline hook (tiny random components; no quality claims)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

import pagkit
from pagkit.cli import main
from pagkit.generate import generate
from pagkit.guidance.engine import GuidedDenoiser
from pagkit.guidance.terms import PAG
from pagkit.inverse import (
    TASKS,
    GaussianDeblur,
    Inpaint,
    OperatorError,
    SuperResolution,
    dps_sample,
    make_operator,
    measure,
    measurement_gradient,
    register,
    restore,
)
from pagkit.inverse.dps import predicted_x0
from pagkit.inverse.latent import latent_dps
from pagkit.inverse.metrics import psnr, restoration_metrics, ssim
from pagkit.inverse.operators import crop
from pagkit.models.unet import NULL_CLASS, build_unet
from pagkit.sampling.loops import make_scheduler
from tiny import prompt_embeds, sd_components, tiny_denoiser_config, write_idx_dataset, write_tiny_denoiser


def _images(n: int = 3, size: int = 28, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_model() -> tuple[torch.nn.Module, object]:
    config = tiny_denoiser_config()
    torch.manual_seed(0)
    return build_unet(config).eval().requires_grad_(False), config


# -- operators --------------------------------------------------------------------------------------------------


def test_inpaint_masks_the_centred_14x14_box() -> None:
    x = _images()
    expected = x.clone()
    expected[..., 7:21, 7:21] = 0.0
    assert torch.equal(make_operator("inpaint")(x), expected)
    y = make_operator("inpaint").measure(x, 0.05, _gens(3))
    assert (y[..., 7:21, 7:21] == 0).all()  # the noise of missing pixels is masked too
    assert 0.03 < float((y - expected).std()) < 0.07


def test_inpaint_custom_mask() -> None:
    mask = torch.ones(28, 28)
    mask[:, :5] = 0
    x = _images()
    assert torch.equal(Inpaint(mask=mask)(x), x * mask)


def test_sr4_is_4x4_average_pooling_and_transpose_is_its_adjoint() -> None:
    op = make_operator("sr4")
    x = _images(2, channels=3)
    y = op(x)
    direct = x.reshape(2, 3, 7, 4, 7, 4).mean(dim=(3, 5))
    assert y.shape == (2, 3, 7, 7)
    torch.testing.assert_close(y, direct)
    v = torch.randn_like(y)
    torch.testing.assert_close((y * v).sum(), (x * op.transpose(v)).sum())  # <Ax, v> = <x, A^T v>
    shown = op.display(y)
    assert shown.shape == x.shape and torch.equal(shown[..., :4, :4], y[..., :1, :1].expand(2, 3, 4, 4))


def test_deblur_equals_direct_convolution_with_reflect_padding() -> None:
    x = _images(1, size=12)
    out = make_operator("deblur")(x)
    r = np.arange(5) - 2
    k = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    k /= k.sum()
    padded = np.pad(x[0, 0].double().numpy(), 2, mode="reflect")
    direct = np.array([[(padded[i : i + 5, j : j + 5] * k).sum() for j in range(12)] for i in range(12)])
    np.testing.assert_allclose(out[0, 0].double().numpy(), direct, atol=1e-6)
    flat = torch.full((1, 1, 12, 12), 0.3)
    torch.testing.assert_close(make_operator("deblur")(flat), flat)  # a normalised kernel


def test_measurement_noise_is_per_image() -> None:
    targets = (torch.rand(5, 28, 28, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    op = make_operator("sr4")
    whole = measure(targets, op, 0.05, seed=3)
    part = measure(targets[2:4], op, 0.05, seed=3, first_index=2)
    assert torch.equal(whole[2:4], part)
    clean = measure(targets, op, 0.0)
    assert 0.03 < float((whole - clean).std()) < 0.07
    assert not torch.equal(measure(targets, op, 0.05, seed=4), whole)


def test_registry_adds_an_operator() -> None:
    register("sr2-test", lambda **kw: SuperResolution(**{"factor": 2, **kw, "name": "sr2-test"}))
    try:
        op = make_operator("sr2-test")
        assert op(_images()).shape == (3, 1, 14, 14)
        with pytest.raises(OperatorError, match="already registered"):
            register("sr2-test", SuperResolution)
    finally:
        TASKS.pop("sr2-test")
    assert isinstance(make_operator("deblur"), GaussianDeblur)
    assert make_operator("deblur", sigma=2.0).sigma == 2.0


# -- bad input, before anything is loaded or sampled ------------------------------------------------------------

MISSING = "/nonexistent/denoiser.safetensors"  # reaching the model loader would raise WeightsError instead


def test_unknown_task() -> None:
    with pytest.raises(OperatorError, match=r"unknown task 'denoise'.*inpaint, sr4, deblur"):
        make_operator("denoise")
    with pytest.raises(OperatorError, match="unknown task"):
        restore(torch.zeros(1, 1, 28, 28), "denoise", weights=MISSING)


def test_image_size_the_operator_cannot_handle() -> None:
    with pytest.raises(OperatorError, match="divisible by 8, got 28x28"):
        restore(torch.zeros(1, 1, 3, 3), SuperResolution(factor=8), weights=MISSING)
    with pytest.raises(OperatorError, match="does not fit"):
        Inpaint(box=30).check((1, 1, 28, 28))
    with pytest.raises(OperatorError, match="divisible by 4"):
        make_operator("sr4")(torch.zeros(1, 1, 30, 30))


def test_mask_of_the_wrong_shape() -> None:
    with pytest.raises(OperatorError, match=r"mask has shape \(32, 32\) but the images are 28x28"):
        restore(torch.zeros(1, 1, 28, 28), Inpaint(mask=torch.ones(32, 32)), weights=MISSING)
    with pytest.raises(OperatorError, match="0/1 tensor"):
        Inpaint(mask=torch.full((28, 28), 0.5))


def test_nan_or_wrong_shape_in_the_measurement() -> None:
    y = torch.zeros(3, 1, 7, 7)
    y[1, 0, 2, 2] = float("nan")
    with pytest.raises(OperatorError, match=r"image\(s\) \[1\] contains NaN"):
        restore(y, "sr4", weights=MISSING)
    with pytest.raises(OperatorError, match=r"measurements must be \[N, 1, 7, 7\]"):
        restore(torch.zeros(3, 1, 28, 28), "sr4", weights=MISSING)
    with pytest.raises(ValueError, match="zeta"):
        restore(torch.zeros(3, 1, 7, 7), "sr4", zeta=float("nan"), weights=MISSING)


# -- the DPS gradient path --------------------------------------------------------------------------------------


def _residual(op: object, y: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda x0: (y - op.forward(crop(x0))).flatten(1).norm(dim=1)  # type: ignore[attr-defined]


def test_dps_step_uses_guided_eps_and_the_unguided_gradient(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """One DPS step, written out: x_{t-1} = step(eps_guided) - zeta grad ||y - A(x0_hat(eps_unguided))||. The
    guided call runs without autograd; the unguided call is the only one that sees a graph."""
    unet, config = tiny_model
    op = make_operator("inpaint")
    y = op.measure(_images(2), 0.05, _gens(2))
    null = {"class_labels": torch.full((2,), NULL_CLASS)}
    pag = GuidedDenoiser(unet, null, terms=[PAG.make(3.0, "mid")])
    seen: dict[str, list[bool]] = {"unguided": [], "guided": []}

    def unguided(x, t):  # type: ignore[no-untyped-def]
        seen["unguided"].append(x.requires_grad and torch.is_grad_enabled())
        return unet(x, t, **null).sample

    def guided(x, t, step):  # type: ignore[no-untyped-def]
        seen["guided"].append(x.requires_grad or torch.is_grad_enabled())
        return pag(x, t, step)

    zeta = 0.7
    scheduler = make_scheduler("ddim", config.scheduler_config())
    out = dps_sample(unguided, _residual(op, y), (2, 1, 32, 32), scheduler, 1, _gens(2), zeta, guided, progress=False)
    assert seen == {"unguided": [True], "guided": [False]}

    # the same step by hand
    x = torch.cat([torch.randn(1, 1, 32, 32, generator=g) for g in _gens(2)])
    t = scheduler.timesteps[0]
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        x0 = predicted_x0(scheduler, xg, unet(xg, t, **null).sample, t)
        grad_u = torch.autograd.grad(_residual(op, y)(x0).sum(), xg)[0]
        xg2 = x.clone().requires_grad_(True)
        grad_g = torch.autograd.grad(_residual(op, y)(predicted_x0(scheduler, xg2, pag(xg2, t), t)).sum(), xg2)[0]
    eps_g = pag(x, t)
    scheduler.set_timesteps(1)
    expected = scheduler.step(eps_g, t, x).prev_sample - zeta * grad_u
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(grad_u, grad_g, atol=1e-4)  # the guided estimate's gradient is a different one
    eps_u = unet(x, t, **null).sample
    assert (scheduler.step(eps_u, t, x).prev_sample - zeta * grad_u - out).abs().max() > 1e-4


def test_measurement_gradient_matches_a_finite_difference(tiny_model) -> None:  # type: ignore[no-untyped-def]
    unet, config = tiny_model
    unet = unet.double()
    try:
        op = make_operator("deblur")
        y = op.measure(_images(2).double(), 0.05, _gens(2))
        scheduler = make_scheduler("ddpm", config.scheduler_config())
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
        fn = lambda x, t: unet(x, t, class_labels=torch.full((2,), NULL_CLASS)).sample  # noqa: E731
        x = torch.randn(2, 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        v = torch.randn_like(x)
        grad, _, norms = measurement_gradient(fn, _residual(op, y), scheduler, x, 600)
        eps = 1e-5

        def total(z: torch.Tensor) -> float:
            with torch.no_grad():
                return float(_residual(op, y)(predicted_x0(scheduler, z, fn(z, 600), 600)).sum())

        fd = (total(x + eps * v) - total(x - eps * v)) / (2 * eps)
        assert norms.shape == (2,)
        assert abs(fd - float((grad * v).sum())) < 1e-6 * max(1.0, abs(fd))
    finally:
        unet.float()


def test_zeta_zero_is_the_plain_guided_sampler(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """With zeta 0 the trajectory is PAG sampling: restore() then equals generate() for the same seeds."""
    y = make_operator("sr4").measure(_images(3), 0.05, _gens(3))
    kw = dict(steps=3, sampler="ddpm", seed=7, model=tiny_model, progress=False)
    ours = restore(y, "sr4", zeta=0.0, pag_scale=2.0, **kw)
    theirs, _ = generate(3, pag_scale=2.0, pag_layers="mid", **kw)
    assert np.array_equal(ours, theirs)


def test_restore_pag_and_batch_independence(tiny_model) -> None:  # type: ignore[no-untyped-def]
    y = make_operator("inpaint").measure(_images(3), 0.05, _gens(3))
    kw = dict(steps=3, zeta=1.0, seed=1, model=tiny_model, progress=False)
    dps = restore(y, "inpaint", pag_scale=0.0, **kw)
    assert dps.shape == (3, 28, 28) and dps.dtype == np.uint8
    assert np.abs(restore(y, "inpaint", pag_scale=0.0, batch_size=2, **kw).astype(int) - dps).max() <= 1
    with_pag = restore(y, "inpaint", pag_scale=3.0, **kw)
    assert np.abs(with_pag.astype(int) - dps).max() > 2


# -- metrics ----------------------------------------------------------------------------------------------------


def test_psnr_ssim_against_direct_values() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    mse = ((a.astype(float) - b) ** 2).reshape(4, -1).mean(1)
    assert psnr(b, a) == pytest.approx(float(np.mean(10 * np.log10(255**2 / mse))), abs=1e-3)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(b, a) < 0.99


def test_restoration_metrics_keys() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    m = restoration_metrics(targets, targets, np.arange(6))
    assert m["psnr"] == float("inf") and m["ssim"] == pytest.approx(1.0)
    assert m["fid"] is None  # 6 images < 128 feature dimensions: undefined
    assert m["accuracy"] == m["target_accuracy"]


# -- pagkit restore ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("restore")
    return write_tiny_denoiser(root / "d.safetensors"), write_idx_dataset(root / "data", n_train=8, n_test=8)


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.output


@pytest.mark.parametrize("task", ["inpaint", "sr4", "deblur"])
def test_cli_restore_npz(tmp_path: Path, files: tuple[Path, Path], task: str) -> None:
    weights, data = files
    out = tmp_path / "r.npz"
    args = ["restore", "--task", task, "--n", "3", "--seed", "1", "--pag-scale", "2", "--steps", "2"]
    code, output = _run(*args, "--weights", str(weights), "--out", str(out), env={"PAGKIT_DATA_DIR": str(data)})
    assert code == 0, output
    npz = np.load(out)
    assert sorted(npz.files) == ["images", "labels", "measurements", "targets"]
    for key in ("images", "targets", "measurements"):
        assert npz[key].shape == (3, 28, 28) and npz[key].dtype == np.uint8, key
    from pagkit.data import load_split

    test = load_split("test", data)
    assert np.array_equal(npz["targets"], test.images[:3]) and np.array_equal(npz["labels"], test.labels[:3])


def test_cli_restore_png_and_errors(tmp_path: Path, files: tuple[Path, Path]) -> None:
    weights, data = files
    png = tmp_path / "r.png"
    base = ["restore", "--n", "2", "--steps", "1", "--weights", str(weights), "--data-dir", str(data)]
    code, output = _run(*base, "--task", "sr4", "--out", str(png))
    assert code == 0, output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.npz"
    code, output = _run(*base, "--task", "denoise", "--out", str(bad))
    assert code != 0 and "denoise" in output
    code, output = _run(*base, "--task", "sr4", "--zeta", "-1", "--out", str(bad))
    assert code != 0 and "zeta" in output
    assert list(tmp_path.iterdir()) == [png]  # no partial files


# -- the latent-pipeline hook -----------------------------------------------------------------------------------


def _latent_pipe(scheduler: str = "ddim") -> StableDiffusionPipeline:
    comps = sd_components()
    if scheduler == "ddpm":
        comps["scheduler"] = DDPMScheduler.from_config(comps["scheduler"].config)
    return StableDiffusionPipeline(**comps)


def test_latent_dps_shapes_and_gradient_through_the_decoder() -> None:
    pipe = _latent_pipe("ddpm")
    op = make_operator("sr4")
    y = op.measure(_images(2, size=16, channels=3), 0.05, _gens(2))
    decoder_grads: list[float] = []
    hook = pipe.vae.decoder.conv_out.register_full_backward_hook(
        lambda m, gin, gout: decoder_grads.append(float(gout[0].abs().sum()))
    )
    norms: list[torch.Tensor] = []
    try:
        out = latent_dps(
            pipe, op, y, prompt_embeds=prompt_embeds(2), generators=_gens(2), steps=3, zeta=0.5, pag_scale=2.0,
            callback=lambda i, z, r: norms.append(r),
        )  # fmt: skip
    finally:
        hook.remove()
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    assert len(decoder_grads) == 3 and all(g > 0 for g in decoder_grads)  # one backward per step, via D
    assert all(r.shape == (2,) and torch.isfinite(r).all() for r in norms)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    fn = lambda x, t: pipe.unet(x, t, encoder_hidden_states=prompt_embeds(2)).sample  # noqa: E731
    from pagkit.inverse.latent import decode

    grad, _, _ = measurement_gradient(fn, lambda z0: (y - op(decode(pipe.vae, z0))).flatten(1).norm(dim=1),
                                      pipe.scheduler, z, 500)  # fmt: skip
    assert grad.shape == z.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_latent_dps_with_zeta_zero_equals_the_pipeline_under_apply_pag() -> None:
    """zeta 0: the PAG-guided pipeline run (no CFG), step for step (same generators, same DDIM updates)."""
    pipe = _latent_pipe()
    op = make_operator("inpaint")
    y = op.measure(_images(2, size=16, channels=3), 0.05, _gens(2))
    ours = latent_dps(pipe, op, y, prompt_embeds=prompt_embeds(2), generators=_gens(2), steps=3, zeta=0.0)
    with pagkit.apply_pag(pipe, scale=4.0, layers="mid"):
        theirs = pipe(
            prompt_embeds=prompt_embeds(2), guidance_scale=1.0, num_inference_steps=3, generator=_gens(2),
            height=16, width=16, output_type="pt",
        ).images  # fmt: skip
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, atol=1e-4, rtol=1e-4)
    other = latent_dps(pipe, op, y, prompt_embeds=prompt_embeds(2), generators=_gens(2), steps=3, zeta=1.0)
    assert (other - ours).abs().max() > 1e-3


def test_latent_dps_rejects_bad_input() -> None:
    pipe = _latent_pipe()
    op = make_operator("sr4")
    kw = dict(prompt_embeds=prompt_embeds(2), generators=_gens(2), steps=1)
    with pytest.raises(OperatorError, match="measurement must be"):
        latent_dps(pipe, op, torch.zeros(2, 3, 16, 16), **kw)
    with pytest.raises(OperatorError, match="NaN"):
        latent_dps(pipe, op, torch.full((2, 3, 4, 4), float("nan")), **kw)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="variance-preserving"):
        latent_dps(pipe, op, torch.zeros(2, 3, 4, 4), **kw)


def test_restore_table_script_smoke(tmp_path: Path, files: tuple[Path, Path]) -> None:
    import importlib.util
    import json

    path = Path(__file__).parent.parent / "scripts" / "restore_table.py"
    spec = importlib.util.spec_from_file_location("restore_table", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    weights, data = files
    args = ["--n", "3", "--tasks", "sr4", "--pag-scales", "0,2", "--steps", "1", "--chunk", "2"]
    args += ["--weights", str(weights), "--data-dir", str(data), "--out-dir", str(tmp_path)]
    assert script.main(args) == 0
    table = json.loads((tmp_path / "table.json").read_text())
    rows = table["tasks"]["sr4"]
    assert [r["pag_scale"] for r in rows] == [0.0, 2.0] and rows[0]["fid"] is None
    assert {"psnr", "ssim", "accuracy", "target_accuracy"} <= set(rows[0])
    assert "| DPS+PAG | 2 |" in (tmp_path / "table.md").read_text()
    assert len(list((tmp_path / "cache").iterdir())) == 4  # 2 scales x 2 chunks, reused on a second run
    assert script.main(args) == 0


def test_issue_and_paper_defaults_are_pinned() -> None:
    from pagkit.inverse import RESTORE

    assert (RESTORE.noise_sigma, RESTORE.steps, RESTORE.pag_layers) == (0.05, 50, "mid")
    assert 4.0 <= RESTORE.pag_scale <= 5.0  # Ahn et al.'s inverse-problem scales
    inpaint, sr, deblur = make_operator("inpaint"), make_operator("sr4"), make_operator("deblur")
    assert (inpaint.box, sr.factor, deblur.kernel, deblur.sigma) == (14, 4, 5, 1.5)
