"""Load a local diffusers pipeline (a folder or a single-file checkpoint) offline, and say what it takes.

``load_pipeline`` never downloads: a folder is read with ``from_pretrained(local_files_only=True)``; a single
file is recognised with diffusers' own checkpoint inference and loaded with the family's ``from_single_file``
(``config=`` a local pipeline folder of the same family gives the component configs offline; without it the
family's configs must be in the local Hugging Face cache: diffusers itself would download them, so pagkit looks them
up in the cache and passes the folder it finds). Every failure is a one-line ``ValueError`` naming the fix.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf")

# diffusers' checkpoint model types (loaders.single_file_utils) that a text-/class-to-image or -video pipeline
# loads from one file, and that pipeline's class
SINGLE_FILE_PIPELINES = {
    "v1": "StableDiffusionPipeline",
    "v2": "StableDiffusionPipeline",
    "xl_base": "StableDiffusionXLPipeline",
    "playground-v2-5": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "sd35_large": "StableDiffusion3Pipeline",
    "sd35_medium": "StableDiffusion3Pipeline",
    "flux-dev": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
    "auraflow": "AuraFlowPipeline",
    "chroma": "ChromaPipeline",
    "ltx-video": "LTXPipeline",
    "mochi-1-preview": "MochiPipeline",
    "hunyuan-video": "HunyuanVideoPipeline",
    "lumina2": "Lumina2Pipeline",
    "sana": "SanaPipeline",
}
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16"}
DTYPES["bf16"] = "bfloat16"
CONFIG_HINT = (
    "pass --config FOLDER, a local diffusers pipeline folder of the same family (its component configs and tokenizers)"
)
# inputs that make a pipeline image-conditioned (img2img, inpainting, ControlNet, upscalers, image-to-video)
IMAGE_INPUTS = ("image", "mask_image", "control_image")


def resolve_device(device: str) -> Any:
    """``auto``: cuda where available, else cpu; any other name is checked to exist here."""
    import torch

    from pagkit.generate import check_device

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(device)


def resolve_dtype(dtype: str, device: Any) -> Any:
    """``auto``: float16 on cuda, float32 elsewhere; else float32 / float16 / bfloat16 (fp32, fp16, bf16)."""
    import torch

    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    name = DTYPES.get(dtype.lower())
    if name is None:
        raise ValueError(f"unknown --dtype {dtype!r}: use auto, float32, float16 or bfloat16")
    return getattr(torch, name)


def _quiet_loading() -> None:
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    try:
        from transformers.utils import logging as tlogging

        tlogging.set_verbosity_error()
        tlogging.disable_progress_bar()
    except ImportError:  # transformers is optional (pipelines without text encoders)
        pass


def _load_folder(path: Path) -> Any:
    from diffusers import DiffusionPipeline

    if not (path / "model_index.json").is_file():
        if (path / "config.json").is_file() or (path / "unet").is_dir() or (path / "transformer").is_dir():
            raise ValueError(
                f"{path} is a diffusers model folder, not a pipeline: give the pipeline folder (the one with "
                "model_index.json, as save_pretrained writes it)"
            )
        raise ValueError(
            f"{path} is not a diffusers pipeline: it has no model_index.json (give a folder written by "
            "pipe.save_pretrained, or a single-file .safetensors/.ckpt checkpoint)"
        )
    import json

    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path / 'model_index.json'}: {e}") from e
    # components saved as None (e.g. no text encoder: the pipeline takes embeddings) are passed as None
    absent = {k: None for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is None}
    try:
        return DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **absent)
    except (OSError, ValueError, KeyError, AttributeError, ImportError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load the pipeline in {path}: {first}") from e


def checkpoint_family(path: Path) -> str:
    """diffusers' model type of a single-file checkpoint; ``ValueError`` for a file it does not recognise."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    try:
        state = load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read {path} as a checkpoint: {first}") from e
    model_type = infer_diffusers_model_type(state)
    # diffusers falls back to "v1" for any state dict: a v1 checkpoint holds the LDM U-Net's keys
    if model_type == "v1" and not any(str(k).startswith("model.diffusion_model.") for k in state):
        model_type = "unknown"
    return str(model_type)


def _load_single_file(path: Path, config: str | None) -> Any:
    import diffusers

    family = checkpoint_family(path)
    name = SINGLE_FILE_PIPELINES.get(family)
    if name is None:
        known = ", ".join(sorted(set(SINGLE_FILE_PIPELINES.values())))
        raise ValueError(
            f"{path} is a checkpoint of an unsupported family ({family}): single files load for {known}; convert it "
            "to a diffusers pipeline folder (save_pretrained) and pass that folder"
        )
    cls = getattr(diffusers, name)
    if config is None:
        config = _cached_config(family, path, name)
    try:
        return cls.from_single_file(str(path), config=config, local_files_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load {path} as a {name} offline ({first}): {CONFIG_HINT}") from e


def _cached_config(family: str, path: Path, name: str) -> str:
    """The local Hugging Face cache's snapshot of the configs diffusers uses for ``family``. Given no ``config``,
    ``from_single_file`` downloads them when they are not cached, even with ``local_files_only=True``."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS
    from huggingface_hub import snapshot_download

    repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS[family]["pretrained_model_name_or_path"]
    try:
        return str(snapshot_download(repo, local_files_only=True))
    except Exception as e:
        raise ValueError(
            f"cannot load {path} as a {name} offline ({repo}'s configs are not in the cache): {CONFIG_HINT}"
        ) from e


def load_pipeline(path: str | Path, device: str = "auto", dtype: str = "auto", config: str | None = None) -> Any:
    """The pipeline at ``path`` (a folder or a single file), on ``device`` in ``dtype``, progress bars off."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--model {path} does not exist: give a local diffusers pipeline folder or checkpoint file")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    _quiet_loading()
    if path.is_dir():
        pipe = _load_folder(path)
    elif path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        pipe = _load_single_file(path, config)
    else:
        raise ValueError(
            f"{path} is not a pipeline: give a diffusers pipeline folder or a checkpoint "
            f"({', '.join(SINGLE_FILE_SUFFIXES)})"
        )
    pipe = pipe.to(dev, torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class PipelineInfo:
    """What a loaded pipeline takes and makes."""

    name: str  # the pipeline's class name
    condition: str  # "prompt", "class" or "none"
    video: bool
    cfg_param: str | None  # the argument that turns classifier-free guidance on (None: the pipeline has none)
    needs_negative: bool  # CFG runs only with a negative prompt (true CFG of guidance-distilled models)
    params: frozenset[str]

    def takes(self, name: str) -> bool:
        return name in self.params


def describe(pipe: Any) -> PipelineInfo:
    """Conditioning, output kind and CFG argument of ``pipe``, read from its ``__call__`` signature."""
    params = frozenset(inspect.signature(pipe.__call__).parameters)
    name = type(pipe).__name__
    if "class_labels" in params:
        condition = "class"
    elif "prompt" in params:
        condition = "prompt"
    else:
        condition = "none"
    if "true_cfg_scale" in params:
        cfg_param: str | None = "true_cfg_scale"
    elif "guidance_scale" in params and condition != "none":
        cfg_param = "guidance_scale"
    else:
        cfg_param = None
    video = getattr(pipe, "video_processor", None) is not None or "num_frames" in params
    return PipelineInfo(name, condition, video, cfg_param, cfg_param == "true_cfg_scale", params)


def check_servable(pipe: Any, info: PipelineInfo) -> None:
    """Refuse pipelines the command line cannot feed: image-conditioned ones, prompts without a tokenizer."""
    image_inputs = [p for p in IMAGE_INPUTS if info.takes(p)]
    if image_inputs and "Kontext" not in info.name:
        raise ValueError(
            f"{info.name} needs an input image ({', '.join(image_inputs)}): pagkit generate serves text- and "
            "class-to-image or -video pipelines; use pagkit.apply_guidance in Python for this one"
        )
    if info.condition == "prompt":
        missing = [n for n in ("tokenizer", "text_encoder") if getattr(pipe, n, "absent") is None]
        if missing:
            raise ValueError(
                f"this {info.name} has no {' or '.join(missing)} (it takes prompt embeddings only): save the pipeline "
                "with its tokenizer and text encoder to use --prompt"
            )
