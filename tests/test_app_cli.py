"""``pagkit generate`` / ``compare`` / ``layers --model`` on tiny random pipelines saved to disk (SD-, SDXL-, Flux-,
Wan- and DiT-shaped, with a local tokenizer and text encoder), and their one-line errors on bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pagkit.cli import main
from test_startup import imported_modules, top_level

FAST = ["--steps", "2", "--device", "cpu", "--threads", "1", "--no-progress"]
SIZE = {"flux": ["--height", "16", "--width", "16"], "wan": ["--height", "32", "--width", "32", "--frames", "5"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from pagkit.testing.saved import save_pipeline

    root = tmp_path_factory.mktemp("pipes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: save_pipeline(name, root / name) for name in ("sd15", "sdxl", "flux", "wan", "dit", "ddpm")}


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "name,extra",
    [
        ("sd15", ["--prompt", "a cat", "--guidance", "cfg:4+pag:3"]),
        ("sdxl", ["--prompt", "a cat", "--negative-prompt", "blurry", "--guidance", "cfg:4+pag:3@mid"]),
        ("flux", ["--prompt", "a cat", "--negative-prompt", "blurry", "--guidance", "cfg:2+pag:3"]),
        ("dit", ["--class", "3", "--guidance", "cfg:4+pag:2"]),
        ("ddpm", ["--guidance", "pag:2"]),
    ],
)
def test_generate_image(saved: dict[str, Path], tmp_path: Path, name: str, extra: list[str]) -> None:
    out = tmp_path / "x.png"
    code, output = run("generate", "--model", str(saved[name]), *extra, *SIZE.get(name, []), *FAST, "--out", str(out))
    assert code == 0, output
    assert output.startswith(f"wrote {out}")
    image = Image.open(out)
    assert image.format == "PNG" and image.mode == "RGB" and min(image.size) >= 8


def test_generate_is_seeded_and_guidance_changes_the_output(saved: dict[str, Path], tmp_path: Path) -> None:
    paths = {}
    for key, spec, seed in (("a", "pag:3", "1"), ("b", "pag:3", "1"), ("none", "none", "1"), ("seed", "pag:3", "2")):
        paths[key] = tmp_path / f"{key}.png"
        args = ["--prompt", "a cat", "--guidance", spec, "--seed", seed]
        code, output = run("generate", "--model", str(saved["sd15"]), *args, *FAST, "--out", str(paths[key]))
        assert code == 0, output
    pixels = {k: np.asarray(Image.open(p)) for k, p in paths.items()}
    assert np.array_equal(pixels["a"], pixels["b"])
    assert not np.array_equal(pixels["a"], pixels["none"])
    assert not np.array_equal(pixels["a"], pixels["seed"])


def test_generate_with_a_cfg_rule_folded_into_the_pipeline(saved: dict[str, Path], tmp_path: Path) -> None:
    """apg:W / cfgzero:W set the pipeline's guidance_scale and replace its combine rule (with PAG beside it)."""
    pixels = {}
    for spec in ("cfg:4+pag:2", "apg:4+pag:2", "cfgzero:4+pag:2"):
        out = tmp_path / f"{spec.replace(':', '_')}.png"
        args = ["--prompt", "a cat", "--negative-prompt", "blurry", "--guidance", spec, "--seed", "1"]
        code, output = run("generate", "--model", str(saved["sd15"]), *args, *FAST, "--out", str(out))
        assert code == 0, output
        assert spec.split("+")[0].split(":")[0] in output
        pixels[spec] = np.asarray(Image.open(out)).astype(int)
    assert np.abs(pixels["apg:4+pag:2"] - pixels["cfg:4+pag:2"]).max() > 0
    assert np.abs(pixels["cfgzero:4+pag:2"] - pixels["cfg:4+pag:2"]).max() > 0


def test_mp4_without_a_writer_is_one_line_and_writes_nothing(
    saved: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("av", "imageio") else real(name, *a)
    )
    out = tmp_path / "v.mp4"
    code, output = run(
        "generate", "--model", str(saved["wan"]), "--prompt", "a", *SIZE["wan"], *FAST, "--out", str(out)
    )
    assert code != 0 and "no MP4 writer is installed (pip install av)" in output
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".gif", ".webp", ".mp4"])
def test_generate_video(saved: dict[str, Path], tmp_path: Path, suffix: str) -> None:
    from pagkit.app.output import mp4_writer

    out = tmp_path / f"v{suffix}"
    args = ["--prompt", "a cat", "--guidance", "cfg:4+pag:3", *SIZE["wan"], *FAST]
    code, output = run("generate", "--model", str(saved["wan"]), *args, "--out", str(out))
    assert code == 0, output
    if suffix == ".mp4":  # the test extra installs PyAV (pagkit[video]): decode what was written
        import av

        assert mp4_writer() == "av"
        with av.open(str(out)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 5 and frames[0].shape[:2] == (32, 32)
        return
    image = Image.open(out)
    assert getattr(image, "n_frames", 1) == 5 and image.size == (32, 32)


def test_compare_grid_and_json(saved: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    settings = ["--guidance", "none", "--guidance", "pag:3", "--guidance", "cfg:4+pag:3"]
    args = ["--prompt", "a cat", *settings, "--seeds", "0,5", *FAST, "--out", str(out)]
    code, output = run("compare", "--model", str(saved["sd15"]), *args)
    assert code == 0, output
    record = json.loads(out.with_suffix(".json").read_text())
    assert [s["guidance"] for s in record["settings"]] == ["none", "pag:3", "cfg:4+pag:3"]
    assert record["seeds"] == [0, 5] and record["pipeline"] == "StableDiffusionPipeline"
    assert record["settings"][2]["pipeline_args"] == {"guidance_scale": 4.0}
    assert record["settings"][0]["pipeline_args"] == {"guidance_scale": 1.0}
    assert all(s["seconds"] > 0 for s in record["settings"])
    grid = Image.open(out)
    assert grid.height > 3 * 128 and 2 * 128 < grid.width < grid.height  # 3 rows, 2 columns of 128 px cells


def test_compare_sweep_class_model_and_video(saved: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sweep.png"
    code, output = run(
        "compare", "--model", str(saved["dit"]), "--class", "1", "--sweep", "pag:0,1,3", "--seeds", "0-1", *FAST,
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, output
    assert [s["guidance"] for s in json.loads(out.with_suffix(".json").read_text())["settings"]] == [
        "pag:0",
        "pag:1",
        "pag:3",
    ]
    gif = tmp_path / "video.gif"
    code, output = run(
        "compare", "--model", str(saved["wan"]), "--prompt", "a cat", "--guidance", "none", "--guidance", "pag:2",
        "--seeds", "0", *SIZE["wan"], *FAST, "--out", str(gif),
    )  # fmt: skip
    assert code == 0, output
    assert getattr(Image.open(gif), "n_frames", 1) == 5


def test_layers_of_a_saved_pipeline(saved: dict[str, Path]) -> None:
    code, output = run("layers", "--model", str(saved["flux"]))
    assert code == 0, output
    assert "transformer_blocks.0.attn  [joint" in output and "single_transformer_blocks.0.attn  [single" in output


def test_sweep_and_seed_parsing() -> None:
    from pagkit.app.compare import expand_sweep, parse_seeds

    assert expand_sweep("cfg:4+pag:0,2@mid") == ["cfg:4+pag:0@mid", "cfg:4+pag:2@mid"]
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]
    with pytest.raises(ValueError, match="one term with a comma-separated list"):
        expand_sweep("pag:3")
    with pytest.raises(ValueError, match="give seeds as"):
        parse_seeds("a")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Refuse every name look-up and connection, and record them (nothing may be downloaded)."""
    import socket

    tried: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        tried.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tried


def test_generate_from_a_single_file_checkpoint(saved: dict[str, Path], tmp_path: Path, no_network: list) -> None:
    """An original-layout SD 1.x .safetensors (``model.diffusion_model.*``, ``first_stage_model.*``,
    ``cond_stage_model.*``) loads through ``from_single_file`` with ``--config FOLDER``, offline, and its weights,
    not the folder's, make the image: the file holds perturbed weights, and the image matches the perturbed pipeline
    saved as a folder."""
    import torch
    from safetensors import safe_open

    from pagkit.app.loading import checkpoint_family, load_pipeline
    from pagkit.testing.single_file import save_sd15_checkpoint

    folder = saved["sd15"]
    pipe = load_pipeline(folder, device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for model in (pipe.unet, pipe.vae, pipe.text_encoder):
            for weight in model.parameters():
                weight.add_(0.1 * torch.randn_like(weight))
    checkpoint = save_sd15_checkpoint(pipe, tmp_path / "sd15.safetensors")
    pipe.save_pretrained(str(tmp_path / "perturbed"))
    assert checkpoint_family(checkpoint) == "v1"
    with safe_open(str(checkpoint), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"model", "first_stage_model", "cond_stage_model"}

    loaded = load_pipeline(checkpoint, device="cpu", config=str(folder))
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name

    pixels = {}
    for key, model, extra in (
        ("file", checkpoint, ["--config", str(folder)]),
        ("perturbed", tmp_path / "perturbed", []),
        ("folder", folder, []),
    ):
        out = tmp_path / f"{key}.png"
        args = ["--prompt", "a cat", "--guidance", "cfg:4+pag:3", "--seed", "3", *extra, *FAST, "--out", str(out)]
        code, output = run("generate", "--model", str(model), *args)
        assert code == 0, output
        assert output.startswith(f"wrote {out}")
        pixels[key] = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(pixels["file"] - pixels["perturbed"]).max() <= 1
    assert np.abs(pixels["file"] - pixels["folder"]).mean() > 10
    assert not no_network


def _junk_checkpoint(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"some.random.weight": torch.zeros(2, 2)}, str(path))
    return path


@pytest.mark.parametrize(
    "case,says",
    [
        ("empty-folder", "has no model_index.json"),
        ("model-folder", "is a diffusers model folder, not a pipeline"),
        ("missing", "does not exist"),
        ("junk-checkpoint", "checkpoint of an unsupported family"),
        ("file-without-config", "configs are not in the cache): pass --config FOLDER"),
        ("text-file", "is not a pipeline"),
        ("prompt-to-class-model", "is class-conditional: give --class N instead of --prompt"),
        ("class-to-text-model", "takes a prompt, not a class"),
        ("cfg-unconditional", "has no classifier-free guidance (no negative branch): drop cfg"),
        ("cfg-without-negative", "only against a negative prompt: add --negative-prompt"),
        ("missing-layer", "matches no self-attention layer"),
        ("video-to-png", "makes video, which .png cannot hold"),
        ("image-to-gif", "makes images, not video"),
        ("bad-extension", "must end in"),
        ("bad-spec", "unknown guidance"),
        ("cfg-rule", "cfg++ renoises with the unconditional prediction"),
        ("no-tokenizer", "has no tokenizer or text_encoder"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    saved: dict[str, Path], tmp_path: Path, no_network: list, case: str, says: str
) -> None:
    from pagkit.testing import families

    sd, out = str(saved["sd15"]), str(tmp_path / "out" / "x.png")
    (tmp_path / "out").mkdir()
    args = {
        "empty-folder": ["--model", str(tmp_path / "out"), "--prompt", "a"],
        "model-folder": ["--model", str(saved["sd15"] / "unet"), "--prompt", "a"],
        "missing": ["--model", str(tmp_path / "nope"), "--prompt", "a"],
        "junk-checkpoint": ["--model", str(_junk_checkpoint(tmp_path / "junk.safetensors")), "--prompt", "a"],
        "text-file": ["--model", str(saved["sd15"] / "model_index.json"), "--prompt", "a"],
        "prompt-to-class-model": ["--model", str(saved["dit"]), "--prompt", "a cat"],
        "class-to-text-model": ["--model", sd, "--class", "2"],
        "cfg-unconditional": ["--model", str(saved["ddpm"]), "--guidance", "cfg:4+pag:2"],
        "cfg-without-negative": ["--model", str(saved["flux"]), "--prompt", "a", "--guidance", "cfg:4", *SIZE["flux"]],
        "missing-layer": ["--model", sd, "--prompt", "a", "--guidance", "pag:3@down.7"],
        "video-to-png": ["--model", str(saved["wan"]), "--prompt", "a", *SIZE["wan"]],
        "image-to-gif": ["--model", sd, "--prompt", "a"],
        "bad-extension": ["--model", sd, "--prompt", "a"],
        "bad-spec": ["--model", sd, "--prompt", "a", "--guidance", "bogus:2"],
        "cfg-rule": ["--model", sd, "--prompt", "a", "--guidance", "cfgpp:0.6"],
        "no-tokenizer": ["--model", "EMBEDS", "--prompt", "a"],
        "file-without-config": ["--model", "CHECKPOINT", "--prompt", "a"],
    }[case]
    if case == "file-without-config":  # diffusers would download the family's configs: pagkit refuses instead
        from pagkit.app.loading import load_pipeline
        from pagkit.testing.single_file import save_sd15_checkpoint

        args[1] = str(save_sd15_checkpoint(load_pipeline(saved["sd15"], device="cpu"), tmp_path / "sd15.safetensors"))
    if case == "no-tokenizer":  # a families pipeline saved as it is: prompt embeddings only
        families.get("sd15").build().save_pretrained(str(tmp_path / "embeds"))
        args[1] = str(tmp_path / "embeds")
    if case == "image-to-gif":
        out = str(tmp_path / "out" / "x.gif")
    if case == "bad-extension":
        out = str(tmp_path / "out" / "x.txt")
    code, output = run("generate", *args, *FAST, "--out", out)
    assert code != 0, output
    assert says in output, output
    assert output.startswith("error: ") and output.count("\n") == 1, output
    assert not list((tmp_path / "out").iterdir())  # no partial file
    assert not no_network  # nothing was looked up online


@pytest.mark.parametrize(
    "args,says",
    [
        (["generate", "--help"], "--negative-prompt"),
        (["compare", "--help"], "--sweep"),
        (["ui", "--help"], "--port"),
        (["generate", "--model", "m", "--out", "x.txt"], "must end in"),
        (["compare", "--model", "m", "--guidance", "none", "--out", "x.mp4"], "must end in"),
    ],
)
def test_commands_start_without_torch(tmp_path: Path, args: list[str], says: str) -> None:
    code, modules, output = imported_modules(args, tmp_path)
    assert says in output and code == (0 if "--help" in args else 2), output
    assert not top_level(modules) & {"torch", "diffusers", "gradio", "numpy"}, sorted(top_level(modules))
