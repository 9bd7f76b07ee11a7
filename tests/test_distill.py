"""pagkit distill: the student, its targets through the engine, training (resume, interruption, DDP), sampling with
one call per step, eval configs, and the errors for bad input."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pagkit.cli import main
from pagkit.distill.student import StudentConfig, StudentUNet, build_student, load_student, save_student
from pagkit.distill.train import DistillConfig, Interrupted, distill, draw_batch, row_loss, teacher_targets
from pagkit.guidance.engine import GuidedDenoiser
from pagkit.guidance.terms import CFG, PAG
from pagkit.models.unet import NULL_CLASS, DenoiserConfig, build_unet, load_denoiser
from pagkit.weights import WeightsError, load_tensors, save_tensors

TINY = DenoiserConfig(block_out_channels=(8, 16, 16), attention_head_dim=8, norm_num_groups=4)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random teacher file (the embedded architecture, narrower) and a 64-image IDX dataset."""
    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    unet = build_unet(TINY)
    with torch.no_grad():  # make the attention matter (random init is near-uniform anyway)
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher = root / "teacher.safetensors"
    save_tensors(teacher, dict(unet.state_dict()), {"denoiser": TINY.to_dict()})
    other = root / "other.safetensors"
    wide = DenoiserConfig(block_out_channels=(16, 16, 16), attention_head_dim=8, norm_num_groups=4)
    save_tensors(other, dict(build_unet(wide).state_dict()), {"denoiser": wide.to_dict()})
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    _write_idx(data / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (64, 28, 28)))
    _write_idx(data / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (64,)))
    return {"root": root, "teacher": teacher, "other": other, "data": data}


FAST = DistillConfig(steps=4, batch_size=4, checkpoint_every=2, bf16=False, warmup_steps=2)


def _run(tiny: dict[str, Path], out: Path, cfg: DistillConfig = FAST, **kw: object) -> Path:
    return distill(out, cfg, teacher_path=tiny["teacher"], data_dir=tiny["data"], progress=False, **kw)  # type: ignore[arg-type]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path)[0]


# -- the student -------------------------------------------------------------------------------------------
def test_fresh_student_is_the_teacher_bit_for_bit() -> None:
    teacher, _ = load_denoiser()
    student = build_student(teacher).eval()
    x = torch.randn(6, 1, 32, 32)
    t = torch.tensor([999, 700, 400, 100, 10, 0])
    y = torch.tensor([0, 3, NULL_CLASS, 7, NULL_CLASS, 9])
    with torch.no_grad():
        ref = teacher(x, t, class_labels=y).sample
        for s, w in ((0.0, 1.0), (2.0, 1.0), (5.0, 3.0), (torch.rand(6) * 5, 1 + torch.rand(6) * 2)):
            assert torch.equal(student(x, t, y, s, w), ref)
    # the hook lives for one call only: the U-Net is left without hooks
    assert not student.unet.time_embedding._forward_hooks


def test_student_scale_embedding_changes_output_after_update() -> None:
    unet = build_unet(TINY)
    student = StudentUNet(unet, StudentConfig())
    with torch.no_grad():
        student.guidance.mlp[2].weight.normal_()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([500, 500])
    with torch.no_grad():
        a, b = student(x, t, None, 0.0, 1.0), student(x, t, None, 4.0, 1.0)
    assert not torch.allclose(a, b)


def test_teacher_targets_match_the_engine_at_fixed_scales() -> None:
    """Per-row targets equal GuidedDenoiser's guided eps with CFG(w) + PAG(s) at those scales."""
    teacher, _ = load_denoiser()
    torch.manual_seed(1)
    x = torch.randn(4, 1, 32, 32)
    t = torch.tensor([800, 500, 300, 50])
    y = torch.tensor([1, 4, 6, 8])
    for s, w in ((2.0, 1.0), (3.0, 1.5), (0.0, 2.5)):
        sv, wv = torch.full((4,), s), torch.full((4,), w)
        target, plain = teacher_targets(teacher, x, t, y, sv, wv, "mid")
        terms = [CFG(w)] if w != 1.0 else []
        terms += [PAG.make(s, "mid")] if s != 0.0 else []
        engine = GuidedDenoiser(teacher, {"class_labels": y}, {"class_labels": torch.full_like(y, NULL_CLASS)}, terms)
        with torch.no_grad():
            ref = engine(x, t)
            ref_plain = teacher(x, t, class_labels=y).sample
        torch.testing.assert_close(target, ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(plain, ref_plain, atol=2e-5, rtol=1e-4)


def test_draw_batch_ranges_and_determinism() -> None:
    images, labels = torch.zeros(50, 1, 32, 32), torch.arange(50) % 10
    cfg = DistillConfig(batch_size=400)
    a = draw_batch(images, labels, 7, cfg, StudentConfig(), 1000)
    b = draw_batch(images, labels, 7, cfg, StudentConfig(), 1000)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("t", "noise", "y", "s", "w"))
    assert float(a.s.min()) == 0.0 and float(a.s.max()) <= 5.0
    assert float(a.w.min()) == 1.0 and float(a.w.max()) <= 3.0
    uncond = a.y == NULL_CLASS
    assert 0 < int(uncond.sum()) < 400
    assert bool((a.w[uncond] == 1.0).all())
    assert bool((a.w[~uncond] > 1.0).any())


# -- training ----------------------------------------------------------------------------------------------
def test_distill_writes_student_log_and_loss_falls(tiny: dict[str, Path], tmp_path: Path) -> None:
    cfg = DistillConfig(steps=30, batch_size=8, checkpoint_every=10, bf16=False, lr=1e-3, guidance_lr=1e-2)
    path = _run(tiny, tmp_path / "run", cfg)
    student, config = load_student(path)
    assert config == TINY and student.config.teacher
    lines = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 3
    import json

    records = [json.loads(line) for line in lines]
    assert records[-1]["step"] == 30 and records[-1]["cpu_seconds"] > 0
    # the student gets closer to the guided targets than the unguided teacher is
    assert records[-1]["loss"] < records[-1]["loss_unguided"]


def test_resume_equals_one_run(tiny: dict[str, Path], tmp_path: Path) -> None:
    _run(tiny, tmp_path / "one")
    _run(tiny, tmp_path / "two", max_steps=2)
    with pytest.raises(FileExistsError, match="--resume"):
        _run(tiny, tmp_path / "two")
    _run(tiny, tmp_path / "two", resume=True)
    a, b = _tensors(tmp_path / "one" / "checkpoint.safetensors"), _tensors(tmp_path / "two" / "checkpoint.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_run_checkpoints_its_step_and_resumes_exactly(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM between checkpoints (step 3 of a cadence of 2) saves step 3; the resumed run equals an
    uninterrupted one."""
    import pagkit.distill.train as train

    _run(tiny, tmp_path / "one")
    calls = {"n": 0}

    class StopAt3(train._Stop):
        @property
        def requested(self) -> bool:  # type: ignore[override]
            calls["n"] += 1
            return calls["n"] >= 3

        @requested.setter
        def requested(self, value: bool) -> None:
            pass

    monkeypatch.setattr(train, "_Stop", StopAt3)
    with pytest.raises(Interrupted, match="step 3"):
        _run(tiny, tmp_path / "cut")
    monkeypatch.undo()
    assert load_tensors(tmp_path / "cut" / "checkpoint.safetensors")[1]["step"] == 3
    _run(tiny, tmp_path / "cut", resume=True)
    a, b = _tensors(tmp_path / "one" / "checkpoint.safetensors"), _tensors(tmp_path / "cut" / "checkpoint.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_in_a_real_process_writes_a_checkpoint(tiny: dict[str, Path], tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "sig"
    cmd = [
        sys.executable, "-m", "pagkit", "distill", "--out", str(out), "--teacher", str(tiny["teacher"]),
        "--data-dir", str(tiny["data"]), "--steps", "100000", "--batch-size", "2", "--checkpoint-every", "100000",
        "--precision", "fp32", "--threads", "1", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "config.json").is_file() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    step = load_tensors(out / "checkpoint.safetensors")[1]["step"]
    assert step >= 1
    assert load_student(out / "student.safetensors")[0].config.pag_max == 5.0


def test_ddp_two_processes_match_one(tiny: dict[str, Path], tmp_path: Path) -> None:
    """torchrun, two CPU processes (gloo), global batch 8: the same updates as one process, within float rounding."""
    common = [
        "-m", "pagkit", "distill", "--teacher", str(tiny["teacher"]), "--data-dir", str(tiny["data"]),
        "--steps", "3", "--batch-size", "8", "--precision", "fp32", "--threads", "1", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, *common, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29671"]
    two = subprocess.run([*run, *common, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    a, b = _tensors(tmp_path / "one" / "checkpoint.safetensors"), _tensors(tmp_path / "two" / "checkpoint.safetensors")
    start = build_student(build_unet(TINY)).state_dict()
    moved = 0.0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
        if k.startswith("model.unet."):
            moved = max(moved, float((a[k] - start[k[6:]]).abs().max()) if k[6:] in start else 0.0)
    assert moved > 1e-4  # the updates were not trivially zero


# -- bad input ---------------------------------------------------------------------------------------------
def test_plain_denoiser_file_is_not_a_student(tiny: dict[str, Path]) -> None:
    with pytest.raises(WeightsError, match="not a distilled student"):
        load_student(tiny["teacher"])


def test_init_from_a_student_continues_it_under_new_settings(tiny: dict[str, Path], tmp_path: Path) -> None:
    """--init STUDENT: the new run starts from the student's U-Net and scale embedding (its first EMA export
    before any update equals the student), e.g. to switch to the relative loss."""
    from dataclasses import replace

    first = _run(tiny, tmp_path / "a", replace(FAST, lr=1e-3, guidance_lr=1e-2))
    before = _tensors(first)
    assert any(float(v.abs().max()) > 0 for k, v in before.items() if k.startswith("guidance.mlp.2"))
    start = build_student(load_denoiser(tiny["teacher"])[0], load_student(first)[0].config)
    assert (start.guidance.mlp[2].weight - before["guidance.mlp.2.weight"]).abs().max() > 1e-2  # trained
    second = distill(tmp_path / "b", replace(FAST, loss="relative"), teacher_path=tiny["teacher"],
                     data_dir=tiny["data"], progress=False, init_path=first, max_steps=1)  # fmt: skip
    after = _tensors(second)  # one step at a small learning rate: close to the student it started from
    for key in ("guidance.mlp.2.weight", "unet.conv_in.weight"):
        assert (after[key] - before[key]).abs().max() < 1e-3, key
    with pytest.raises(ValueError, match="use the same ranges"):
        from pagkit.distill.student import StudentConfig as SC

        distill(tmp_path / "c", FAST, SC(pag_max=3.0), teacher_path=tiny["teacher"], data_dir=tiny["data"],
                progress=False, init_path=first)  # fmt: skip


def test_architecture_mismatch_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="architecture mismatch"):
        _run(tiny, tmp_path / "x", init_path=tiny["other"])
    # a student file whose tensors do not match its config
    student = build_student(build_unet(TINY))
    bad = tmp_path / "bad.safetensors"
    wide = DenoiserConfig(block_out_channels=(16, 16, 16), attention_head_dim=8, norm_num_groups=4)
    save_student(bad, student, wide)
    with pytest.raises(WeightsError, match="architecture mismatch"):
        load_student(bad)


def test_resume_with_other_settings_or_teacher_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    _run(tiny, tmp_path / "r", max_steps=2)
    from dataclasses import replace

    with pytest.raises(ValueError, match="settings"):
        _run(tiny, tmp_path / "r", replace(FAST, ema_decay=0.9), resume=True)
    with pytest.raises(ValueError, match="loss"):
        _run(tiny, tmp_path / "r", replace(FAST, loss="relative"), resume=True)
    with pytest.raises(ValueError, match="teacher"):
        distill(tmp_path / "r", FAST, teacher_path=tiny["other"], data_dir=tiny["data"], progress=False, resume=True)
    with pytest.raises(FileNotFoundError, match="drop --resume"):
        _run(tiny, tmp_path / "none", resume=True)
    # learning rates and length may change on resume (the log records them)
    _run(tiny, tmp_path / "r", replace(FAST, lr=3e-4, steps=6), resume=True)
    assert '"lr": 0.0003' in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()[-1]


def test_scales_outside_the_trained_range_are_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    from pagkit.generate import generate

    student = build_student(build_unet(TINY)).eval().requires_grad_(False)
    model = (student, TINY)
    for kw, match in (
        ({"pag_scale": 5.5}, r"outside .* \[0, 5\]"),
        ({"pag_scale": -1.0}, r"outside"),
        ({"pag_scale": 1.0, "cfg_scale": 3.5, "label": 2}, r"CFG scale 3.5 is outside"),
        ({"pag_scale": 1.0, "pag_layers": "down.2"}, "learned PAG on 'mid'"),
        ({"pag_scale": 1.0, "reuse_delta": 2}, "reuse-delta"),
        ({"pag_scale": 1.0, "sag_scale": 0.5}, "SAG"),
    ):
        with pytest.raises(ValueError, match=match):
            generate(2, steps=2, model=model, progress=False, **kw)  # type: ignore[arg-type]


# -- sampling ----------------------------------------------------------------------------------------------
def test_student_sampling_makes_one_model_call_per_step(tiny: dict[str, Path]) -> None:
    from pagkit.generate import generate

    student = build_student(build_unet(TINY)).eval().requires_grad_(False)
    calls: list[int] = []
    handle = student.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        for kw in ({"pag_scale": 3.0}, {"pag_scale": 1.0, "cfg_scale": 2.0, "label": 4}, {"pag_scale": 0.0}):
            calls.clear()
            generate(3, steps=5, model=(student, TINY), progress=False, **kw)  # type: ignore[arg-type]
            assert calls == [3] * 5
    finally:
        handle.remove()
    # a fresh student samples exactly what the unguided teacher samples
    a, _ = generate(2, steps=3, model=(student, TINY), pag_scale=2.0, progress=False)
    b, _ = generate(2, steps=3, model=(student.unet, TINY), pag_scale=0.0, progress=False)
    assert np.array_equal(a, b)


def test_cli_sample_distilled(tiny: dict[str, Path], tmp_path: Path) -> None:
    student = build_student(build_unet(TINY))
    path = tmp_path / "student.safetensors"
    save_student(path, student, TINY)
    runner = CliRunner()
    base = ["sample", "--n", "2", "--steps", "2", "--threads", "1", "--no-progress"]
    r = runner.invoke(main, [*base, "--model", "distilled", "--student", str(path), "--out", str(tmp_path / "a.npz")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        main,
        [*base, "--model", "distilled", "--student", str(path), "--pag-scale", "1", "--cfg-scale", "2", "--label", "3",
         "--out", str(tmp_path / "b.npz")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    for args, message in (
        (["--model", "distilled", "--student", str(tiny["teacher"])], "not a distilled student"),
        (["--model", "distilled", "--student", str(path), "--pag-scale", "9"], "outside"),
        (["--student", str(path)], "--student needs --model distilled"),
    ):
        r = runner.invoke(main, [*base, *args, "--out", str(tmp_path / "c.npz")])
        assert r.exit_code == 2 and message in r.output, r.output


def test_eval_configs_distilled(tmp_path: Path) -> None:
    from pagkit.eval.configs import ConfigError, parse_configs

    configs = parse_configs("none,pag:2,distilled:pag:2,distilled:cfg:1.25+pag:1,distilled:none")
    assert [c.student for c in configs] == [None, None, "default", "default", "default"]
    assert configs[3].cfg_scale == 1.25 and configs[3].pag_scale == 1.0
    assert configs[2].family() == ("distilled:pag", 2.0)
    # plain configs keep their generate() arguments (and so their cached samples' keys)
    assert "student" not in configs[1].generate_kwargs()
    for bad in ("distilled:sag:1", "distilled:pag:2%2", "distilled:distilled:pag:1"):
        with pytest.raises(ConfigError):
            parse_configs(bad)


def test_generate_with_student_file_and_digest(tiny: dict[str, Path], tmp_path: Path) -> None:
    from pagkit.distill.student import student_digest
    from pagkit.generate import generate

    student = build_student(build_unet(TINY))
    path = tmp_path / "s.safetensors"
    save_student(path, student, TINY)
    teacher = (build_unet(TINY).eval(), TINY)
    digest = student_digest(path)
    a, _ = generate(2, steps=2, model=teacher, student=str(path), student_digest=digest, progress=False)
    b, _ = generate(2, steps=2, model=(student.eval(), TINY), pag_scale=2.0, progress=False)
    assert np.array_equal(a, b)
    with pytest.raises(WeightsError, match="changed"):
        generate(2, steps=2, model=teacher, student=str(path), student_digest="0" * 16, progress=False)


# -- LoRA distillation on diffusers pipelines --------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sana"])
def test_lora_distillation_end_to_end(family: str, tmp_path: Path) -> None:
    """SD-shaped U-Net and DiT (Sana) tiny pipelines: the loss falls, the adapter round-trips through diffusers'
    own LoRA loading, and sampling with it makes one denoiser call per step that reproduces the trained model."""
    pytest.importorskip("peft")
    from pagkit.distill.lora import distill_pag_lora
    from pagkit.testing import families

    fam = families.get(family)
    pipe = fam.build()
    call = fam.call([0, 1])
    call.pop("generator")
    steps, w = call.pop("num_inference_steps"), call.pop("guidance_scale")
    model = getattr(pipe, fam.denoiser)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    result = distill_pag_lora(
        pipe, [call], tmp_path / "lora", pag_scale=3.0, guidance_scale=w, layers=fam.layers, steps=60, lr=3e-3,
        num_inference_steps=4, keep_adapter=True, progress=False,
    )  # fmt: skip
    assert result.path.is_file() and result.calls == 4
    assert result.loss_after < 0.7 * result.loss_before, (result.loss_before, result.loss_after)
    # sampling with the trained adapter in place, to compare with the adapter loaded back
    kw = {**call, "num_inference_steps": steps, "guidance_scale": w, "generator": torch.Generator().manual_seed(0)}
    with torch.no_grad():
        trained = families.output_tensor(pipe(**kw))
    model.unload_lora()
    after_state = model.state_dict()  # the denoiser's own weights, untouched by the training
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)

    fresh = fam.build()
    fresh.load_lora_weights(str(tmp_path / "lora"), weight_name=result.weight_name, adapter_name="pag")
    denoiser = getattr(fresh, fam.denoiser)
    calls: list[int] = []
    handle = denoiser.register_forward_hook(lambda m, a, o: calls.append(1))
    kw["generator"] = torch.Generator().manual_seed(0)
    with torch.no_grad():
        loaded = families.output_tensor(fresh(**kw))
    handle.remove()
    assert len(calls) == steps  # one denoiser call per step ([uncond, cond] in one batch)
    torch.testing.assert_close(loaded, trained, atol=1e-4, rtol=1e-4)


def test_lora_distillation_refuses_pipelines_without_a_lora_loader(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from pagkit.distill.lora import distill_pag_lora
    from pagkit.testing import families

    fam = families.get("pixart-sigma")
    with pytest.raises(NotImplementedError, match="LoRA loader"):
        distill_pag_lora(fam.build(), [fam.call([0])], tmp_path, layers=fam.layers, steps=1, progress=False)


# -- "training PAG": identity-attention dropout ------------------------------------------------------------
def test_identity_dropout_finetuning_runs_resumes_and_perturbs(tiny: dict[str, Path], tmp_path: Path) -> None:
    from pagkit.distill.training_pag import DropoutConfig, finetune_identity_dropout

    cfg = DropoutConfig(p=0.5, steps=4, batch_size=4, checkpoint_every=2, warmup_steps=1)
    one = finetune_identity_dropout(tmp_path / "one", cfg, tiny["teacher"], tiny["data"], progress=False)
    finetune_identity_dropout(tmp_path / "two", cfg, tiny["teacher"], tiny["data"], max_steps=2, progress=False)
    two = finetune_identity_dropout(tmp_path / "two", cfg, tiny["teacher"], tiny["data"], resume=True, progress=False)
    a, b = _tensors(one), _tensors(two)
    assert all(torch.equal(a[k], b[k]) for k in a)
    model, _ = load_denoiser(one)  # eval --weights reads it
    # the dropout changed the updates: p = 0 gives other weights
    from dataclasses import replace

    zero = finetune_identity_dropout(
        tmp_path / "zero", replace(cfg, p=0.0), tiny["teacher"], tiny["data"], progress=False
    )
    c = _tensors(zero)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert model is not None


def test_damaged_checkpoint_is_a_clear_error(tiny: dict[str, Path], tmp_path: Path) -> None:
    _run(tiny, tmp_path / "d", max_steps=2)
    ckpt = tmp_path / "d" / "checkpoint.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-100] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        _run(tiny, tmp_path / "d", resume=True)


def test_cli_distill_errors(tiny: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["distill", "--teacher", str(tiny["teacher"]), "--data-dir", str(tiny["data"]), "--threads", "1"]
    r = runner.invoke(main, [*base, "--out", str(tmp_path / "a"), "--cfg-max", "0.5"])
    assert r.exit_code == 2 and "--cfg-max" in r.output, r.output
    r = runner.invoke(main, [*base, "--out", str(tmp_path / "b"), "--resume"])
    assert r.exit_code == 2 and "drop --resume" in r.output, r.output
    r = runner.invoke(main, [*base, "--out", str(tmp_path / "c"), "--pag-layers", "nonexistent.layer"])
    assert r.exit_code == 2 and "error:" in r.output, r.output
    r = runner.invoke(main, [*base, "--out", str(tmp_path / "d"), "--init", str(tiny["other"])])
    assert r.exit_code == 2 and "architecture mismatch" in r.output, r.output


def test_distilled_config_uses_pagkit_student_and_its_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pagkit.distill.student import student_digest
    from pagkit.eval.configs import parse_configs

    path = tmp_path / "s.safetensors"
    save_student(path, build_student(build_unet(TINY)), TINY)
    monkeypatch.setenv("PAGKIT_STUDENT", str(path))
    config = parse_configs("distilled:pag:2")[0]
    kwargs = config.generate_kwargs()
    assert kwargs["student"] == "default" and kwargs["student_digest"] == student_digest(path)
    assert config.key() != parse_configs("pag:2")[0].key()
    monkeypatch.setenv("PAGKIT_STUDENT", str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsError, match="not found"):
        config.generate_kwargs()


def test_cli_distill_row_shares(tiny: dict[str, Path], tmp_path: Path) -> None:
    import json

    runner = CliRunner()
    out = tmp_path / "shares"
    r = runner.invoke(
        main,
        ["distill", "--teacher", str(tiny["teacher"]), "--data-dir", str(tiny["data"]), "--threads", "1",
         "--out", str(out), "--steps", "1", "--batch-size", "2", "--precision", "fp32", "--no-progress",
         "--pag-zero-fraction", "0.25", "--uncond-fraction", "0.5", "--loss", "relative"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    assert config["distill"]["pag_zero_fraction"] == 0.25 and config["distill"]["uncond_fraction"] == 0.5
    assert config["distill"]["loss"] == "relative"


def test_relative_loss_weighs_rows_by_their_own_guidance_change() -> None:
    g = torch.Generator().manual_seed(0)
    plain = torch.randn(3, 1, 4, 4, generator=g)
    direction = torch.randn(3, 1, 4, 4, generator=g)
    target = plain + torch.tensor([0.0, 0.5, 5.0])[:, None, None, None] * direction  # s = 0, 0.5, 5
    pred = target + 0.01 * torch.randn(3, 1, 4, 4, generator=g)
    torch.testing.assert_close(row_loss(pred, target, plain, "mse"), torch.nn.functional.mse_loss(pred, target))
    # the same error costs most on the s = 0 row, then s = 0.5, least at s = 5
    costs = []
    for row in range(3):
        p = target.clone()
        p[row] += 0.1
        costs.append(float(row_loss(p, target, plain, "relative")))
    assert costs[0] > costs[1] > costs[2]
    # errors proportional to each row's change cost the same on the guided rows (up to the floor)
    per_row = []
    for row in (1, 2):
        p = target.clone()
        p[row] += 0.2 * (target - plain)[row]
        per_row.append(float(row_loss(p, target, plain, "relative")))
    assert per_row[0] == pytest.approx(per_row[1], rel=0.15)
    with pytest.raises(ValueError, match="loss must be one of"):
        DistillConfig(loss="l1").check()


def test_the_shipped_student_loads_and_matches_the_shipped_teacher() -> None:
    from pagkit.distill.student import default_student_path
    from pagkit.models.unet import default_denoiser_path
    from pagkit.parts import file_digest

    student, config = load_student()
    _, tconfig = load_denoiser()
    assert config == tconfig and student.config.teacher == file_digest(default_denoiser_path())
    assert default_student_path().stat().st_size < 25 * 2**20  # the size limit
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([500, 500]), torch.tensor([NULL_CLASS, 3])
    with torch.no_grad():
        at0, at3 = student(x, t, y, 0.0, 1.0), student(x, t, y, 3.0, 1.0)
    assert not torch.allclose(at0, at3)  # the scale is a knob
