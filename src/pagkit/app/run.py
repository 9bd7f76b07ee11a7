"""Run a loaded diffusers pipeline under a guidance spec (the one syntax of ``pagkit sample``/``pagkit eval``).

CFG is the pipeline's own: ``cfg:W`` becomes the pipeline's ``guidance_scale`` (or ``true_cfg_scale`` for
guidance-distilled models such as Flux, whose ``guidance_scale`` is an embedded guidance strength), and
``rescale:W/phi:P`` its ``guidance_scale`` and ``guidance_rescale``; no CFG term means CFG off. A rule that
replaces CFG's combine (``apg:W``, ``cfgzero:W``, ``cfg:W~interval...``) sets ``guidance_scale=W`` and is folded
into the pipeline's CFG by :func:`pagkit.apply_guidance` (cfg++ needs the sampler: refused). Every other term
(PAG and its kin) goes to :func:`pagkit.apply_guidance`. A weak-branch term without ``@layers`` takes ``mid``
where the denoiser has a mid block, else the middle one of its self-attention layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pagkit.app.loading import PipelineInfo, describe


@dataclass
class Inputs:
    """What a run is conditioned on, and its size."""

    prompt: str | None = None
    negative_prompt: str | None = None
    class_label: int | None = None
    steps: int = 30
    height: int | None = None
    width: int | None = None
    frames: int | None = None


@dataclass
class Plan:
    """A guidance spec resolved against one pipeline: its call arguments and the terms to apply."""

    text: str
    call: dict[str, Any] = field(default_factory=dict)
    terms: list[Any] = field(default_factory=list)
    reuse: int = 1
    described: list[str] = field(default_factory=list)


def _explicit_layers(text: str) -> list[bool]:
    from pagkit.guidance.spec import split_outside

    return ["@" in part for part in split_outside(text, "+")]


def default_layers(model: Any) -> str:
    """``mid`` where the denoiser has self-attention in a mid block, else its middle self-attention layer."""
    from pagkit.layers import list_layers

    layers = list_layers(model)
    if not layers:
        return "mid"  # select_layers then explains that the model has no self-attention
    if any(layer.name.startswith("mid_block.") for layer in layers):
        return "mid"
    return layers[len(layers) // 2].name


def plan(pipe: Any, text: str, inputs: Inputs, info: PipelineInfo | None = None) -> Plan:
    """Resolve a guidance spec for ``pipe``: a one-line ``ValueError`` where the pipeline cannot serve it."""
    from pagkit.guidance.spec import build_term, parse_guidance
    from pagkit.integrations.diffusers import denoiser_of
    from pagkit.layers import select_layers

    info = info or describe(pipe)
    parsed = parse_guidance(text)
    out = Plan(parsed.text)
    if info.cfg_param is not None:
        out.call[info.cfg_param] = 1.0  # CFG off unless the spec asks for it
    model, _ = denoiser_of(pipe)
    explicit = _explicit_layers(parsed.text) if parsed.terms else []
    for term, given in zip(parsed.terms, explicit, strict=True):
        name = term.method.name
        if term.method.kind == "cfg":
            if info.cfg_param is None:
                raise ValueError(
                    f"{info.name} has no classifier-free guidance (no negative branch): drop {name} from --guidance"
                )
            if info.needs_negative and term.scale > 1.0 and not inputs.negative_prompt:
                raise ValueError(
                    f"{info.name} runs CFG ({info.cfg_param}) only against a negative prompt: add --negative-prompt"
                )
            if name == "cfgpp":
                raise ValueError(
                    "cfg++ renoises with the unconditional prediction, which a pipeline's scheduler cannot do: use "
                    "pagkit sample for the embedded model"
                )
            out.call[info.cfg_param] = term.scale
            if name == "rescale" and term.schedule is None:  # the pipeline's own guidance_rescale
                if not info.takes("guidance_rescale") or info.cfg_param != "guidance_scale":
                    raise ValueError(f"{info.name} has no guidance_rescale: use cfg:W instead of rescale")
                out.call["guidance_rescale"] = float(term.options["phi"])
            elif name != "cfg" or term.schedule is not None:  # a rule pagkit folds into the pipeline's CFG
                if info.cfg_param != "guidance_scale":
                    raise ValueError(
                        f"{name} replaces CFG's combine rule, which pagkit folds into a pipeline's guidance_scale; "
                        f"{info.name} runs CFG with {info.cfg_param}: use cfg:W (or weak-branch methods) with it"
                    )
                out.terms.append(build_term(term))
                out.described.append(term.text())
                continue
            out.described.append(f"{info.cfg_param}={term.scale:g}")
            continue
        if term.method.kind == "sag":
            raise ValueError("sag runs in pagkit's own loop only (pagkit sample); on pipelines use pag, seg, slg, tpg")
        if term.method.layers is not None:
            if not given:
                term = dataclasses.replace(term, layers=default_layers(model))
            select_layers(model, term.layers or "mid")  # a layer that is not there: the valid ones in the error
        out.terms.append(build_term(term))
        out.described.append(term.text())
    out.reuse = parsed.reuse_delta
    if not out.described:
        out.described.append("unguided")
    return out


def check_inputs(info: PipelineInfo, inputs: Inputs) -> None:
    """The conditioning must fit the pipeline: a prompt for text models, a class for class-conditional ones."""
    if info.condition == "class":
        if inputs.prompt is not None or inputs.negative_prompt is not None:
            raise ValueError(f"{info.name} is class-conditional: give --class N instead of --prompt")
        if inputs.class_label is None:
            raise ValueError(f"{info.name} is class-conditional: give --class N")
    elif info.condition == "prompt":
        if inputs.class_label is not None:
            raise ValueError(f"{info.name} takes a prompt, not a class: give --prompt TEXT instead of --class")
        if inputs.prompt is None:
            raise ValueError(f"{info.name} takes a prompt: give --prompt TEXT")
    else:
        if inputs.prompt is not None or inputs.class_label is not None or inputs.negative_prompt is not None:
            raise ValueError(f"{info.name} is unconditional: drop --prompt/--negative-prompt/--class")
    for name, value in (("--height", inputs.height), ("--width", inputs.width)):
        if value is not None and not info.takes(name[2:]):
            raise ValueError(f"{info.name} has no {name[2:]} argument: drop {name}")
    if inputs.frames is not None and not info.takes("num_frames"):
        raise ValueError(f"{info.name} makes no video: drop --frames")


def call_kwargs(info: PipelineInfo, inputs: Inputs, seeds: Sequence[int]) -> dict[str, Any]:
    """The pipeline call's arguments for one batch, one CPU generator per seed (image i depends on seeds[i])."""
    import torch

    n = len(seeds)
    kw: dict[str, Any] = {
        "generator": [torch.Generator().manual_seed(int(s)) for s in seeds],
        "num_inference_steps": inputs.steps,
        "output_type": "np",
    }
    if info.condition == "class":
        kw["class_labels"] = [int(inputs.class_label or 0)] * n
    elif info.condition == "prompt":
        kw["prompt"] = [inputs.prompt or ""] * n
        if inputs.negative_prompt is not None and info.takes("negative_prompt"):
            kw["negative_prompt"] = [inputs.negative_prompt] * n
    else:
        kw["batch_size"] = n
    if inputs.height is not None:
        kw["height"] = inputs.height
    if inputs.width is not None:
        kw["width"] = inputs.width
    if inputs.frames is not None:
        kw["num_frames"] = inputs.frames
    return kw


def to_uint8(value: Any) -> np.ndarray:
    """A pipeline's images / frames as uint8 ``[N, H, W, 3]`` (images) or ``[N, F, H, W, 3]`` (video)."""
    import torch
    from PIL import Image

    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().numpy()
    if isinstance(value, list):
        if value and isinstance(value[0], Image.Image):
            value = np.stack([np.asarray(im.convert("RGB")) for im in value])
        else:
            value = np.stack([to_uint8(v) for v in value])
    arr = np.asarray(value)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] != 3 and arr.ndim >= 4 and arr.shape[-3] in (1, 3):  # channels first
        arr = np.moveaxis(arr, -3, -1)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
    return arr


def run(
    pipe: Any, guidance: Plan, inputs: Inputs, seeds: Sequence[int], info: PipelineInfo | None = None
) -> np.ndarray:
    """Images ``[N, H, W, 3]`` or videos ``[N, F, H, W, 3]`` (uint8), one per seed, under ``guidance``."""
    import torch

    from pagkit.integrations.diffusers import apply_guidance

    info = info or describe(pipe)
    kw = {**call_kwargs(info, inputs, seeds), **guidance.call}
    handle: Any = (
        apply_guidance(pipe, *guidance.terms, reuse_delta=guidance.reuse)
        if guidance.terms
        else contextlib.nullcontext()
    )
    with handle, torch.inference_mode():
        result = pipe(**kw)
    for attr in ("frames", "videos", "images"):
        value = getattr(result, attr, None)
        if value is not None:
            break
    else:
        value = result[0] if isinstance(result, tuple) else result
    arr = to_uint8(value)
    if arr.ndim == 4 and attr in ("frames", "videos"):  # one video as [F, H, W, 3]
        arr = arr[None]
    if arr.shape[0] != len(seeds):
        raise ValueError(f"{info.name} returned {arr.shape[0]} outputs for {len(seeds)} seeds")
    if math.prod(arr.shape) == 0:
        raise ValueError(f"{info.name} returned an empty output")
    return arr
