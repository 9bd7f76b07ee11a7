"""Distil PAG into a LoRA adapter of a diffusers pipeline's denoiser: PAG at the cost of one denoiser call per step.

:func:`distill_pag_lora` takes a pipeline and a list of prompts (strings, or dicts of pipeline keyword arguments
such as ``prompt_embeds``), and:

1. runs the pipeline with PAG (``pagkit.apply_pag``, the teacher, prefix sharing on) on every prompt and records
   the denoiser's calls on that trajectory (latents, timestep, text conditions), and which rows are conditional;
2. computes for each recorded call the teacher's targets with pagkit's engine on the bare denoiser: the
   conditional rows get ``eps_c + (s / w)(eps_c - eps_perturbed)``, the unconditional rows keep ``eps_u``. The
   pipeline's own CFG then turns the student's prediction into ``eps_u + w (eps_c - eps_u) + s (eps_c -
   eps_perturbed)``, the teacher's CFG+PAG, at the CFG weight ``w`` it was distilled for (without CFG: ``s``);
3. trains a LoRA adapter (peft, on the attention projections) on the MSE to those targets;
4. saves it with the pipeline class's own ``save_lora_weights`` (safetensors), so that
   ``pipe.load_lora_weights(folder, weight_name=...)`` loads it back.

Sampling with the adapter is the plain pipeline: one denoiser call per step, no perturbed rows. The adapter is
distilled for one ``(s, w)``; ``pipe.set_adapters(name, weight)`` scales it (roughly, not exactly, a scale of the
PAG term). What a real Stable Diffusion run needs is in docs/distill.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class RecordedCall:
    """One denoiser call of the teacher's run: its inputs and which rows are conditional (None: all rows)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    cond: torch.Tensor
    partners: torch.Tensor | None
    target: torch.Tensor | None = None


@dataclass
class LoraDistillResult:
    """Where the adapter went and how training went."""

    folder: Path
    weight_name: str
    adapter_name: str
    losses: list[float] = field(default_factory=list)
    calls: int = 0
    loss_before: float = float("nan")  # MSE to the targets over every recorded call: the plain denoiser
    loss_after: float = float("nan")  # ... and with the trained adapter

    @property
    def path(self) -> Path:
        return self.folder / self.weight_name


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def _denoiser_attr(pipe: Any, model: nn.Module) -> str:
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is model:
            return name
    raise ValueError(f"{type(pipe).__name__} has no unet or transformer: not a diffusers pipeline pagkit can distil")


def _call_kwargs(prompt: str | Mapping[str, Any], base: Mapping[str, Any], seed: int) -> dict[str, Any]:
    kw = dict(base)
    if isinstance(prompt, str):
        kw["prompt"] = prompt
    elif isinstance(prompt, Mapping):
        kw.update(prompt)
    else:
        raise TypeError(f"a prompt is a string or a dict of pipeline arguments, got {type(prompt).__name__}")
    kw.setdefault("generator", torch.Generator().manual_seed(seed))
    kw["output_type"] = "latent"
    return kw


def record_teacher_calls(
    pipe: Any,
    prompts: Sequence[str | Mapping[str, Any]],
    pag_scale: float,
    guidance_scale: float,
    layers: str,
    perturbation: str = "identity",
    num_inference_steps: int = 20,
    seed: int = 0,
    call_kwargs: Mapping[str, Any] | None = None,
) -> list[RecordedCall]:
    """Run the pipeline with PAG on every prompt; return its denoiser calls (inputs as the pipeline made them)."""
    from pagkit.integrations.diffusers import apply_pag, denoiser_of
    from pagkit.integrations.layouts import ModelCall

    model, _ = denoiser_of(pipe)
    calls: list[RecordedCall] = []
    handle_box: list[Any] = []

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample: Any = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep", kwargs.get("t"))
        roles = handle_box[0].layout.roles(ModelCall(sample, timestep, args, kwargs))
        if roles.kind != "main":
            raise NotImplementedError(
                f"LoRA distillation needs the conditional rows (and their CFG partners) in one denoiser call; "
                f"{type(pipe).__name__} makes {roles.kind!r} calls (one call per branch)"
            )
        calls.append(RecordedCall(_clone(args), _clone(kwargs), roles.cond.clone(), _clone(roles.partners)))

    hook = model.register_forward_pre_hook(before, with_kwargs=True)  # runs before pagkit's own hook
    try:
        with apply_pag(pipe, scale=pag_scale, layers=layers, perturbation=perturbation) as handle:
            handle_box.append(handle)
            base = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, **(call_kwargs or {})}
            for i, prompt in enumerate(prompts):
                with torch.no_grad():
                    pipe(**_call_kwargs(prompt, base, seed + i))
    finally:
        hook.remove()
    return calls


@torch.no_grad()
def teacher_targets(
    model: nn.Module, calls: Sequence[RecordedCall], pag_scale: float, guidance_scale: float, layers: str,
    perturbation: str = "identity",
) -> None:  # fmt: skip
    """Fill each call's target: ``eps_c + (s / w)(eps_c - eps_perturbed)`` on the conditional rows (``s`` without
    CFG), the unguided prediction elsewhere; the PAG branch through pagkit's engine (prefix sharing on)."""
    from pagkit.batch import first_tensor
    from pagkit.integrations.diffusers import apply_pag

    for call in calls:
        plain = first_tensor(model(*call.args, **call.kwargs)).float()
        with_cfg = call.partners is not None
        scale = pag_scale / guidance_scale if with_cfg else pag_scale
        with apply_pag(model, scale=scale, layers=layers, perturbation=perturbation, cfg=with_cfg):
            guided = first_tensor(model(*call.args, **call.kwargs)).float()
        target = plain.clone()
        target[call.cond] = guided[call.cond]
        call.target = target


def distill_pag_lora(
    pipe: Any,
    prompts: Sequence[str | Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    pag_scale: float = 3.0,
    guidance_scale: float = 1.0,
    layers: str = "mid",
    perturbation: str = "identity",
    rank: int = 4,
    alpha: int | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    steps: int = 200,
    lr: float = 1e-3,
    num_inference_steps: int = 20,
    seed: int = 0,
    call_kwargs: Mapping[str, Any] | None = None,
    weight_name: str = "pag_lora.safetensors",
    adapter_name: str = "pag_distilled",
    keep_adapter: bool = False,
    progress: bool = True,
) -> LoraDistillResult:
    """Distil PAG (scale ``pag_scale``, with the pipeline's CFG at ``guidance_scale``) into a LoRA adapter of
    ``pipe``'s denoiser, trained on the teacher's trajectories for ``prompts``; save it to ``out_dir/weight_name``.

    ``prompts``: strings (the pipeline encodes them) or dicts of pipeline arguments (e.g. ``prompt_embeds``).
    ``call_kwargs``: more arguments of every pipeline call (e.g. ``height``, ``width``). The pipeline's denoiser is
    left as it was unless ``keep_adapter`` (then the trained adapter stays active under ``adapter_name``)."""
    try:
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict
    except ModuleNotFoundError:
        raise ModuleNotFoundError("LoRA distillation needs peft: pip install 'pagkit[distill]'") from None
    from diffusers.utils import convert_state_dict_to_diffusers
    from tqdm.auto import tqdm

    from pagkit.batch import first_tensor
    from pagkit.integrations.diffusers import denoiser_of

    if not prompts:
        raise ValueError("give at least one prompt")
    if steps < 1 or rank < 1:
        raise ValueError("steps and rank must be >= 1")
    model, _ = denoiser_of(pipe)
    attr = _denoiser_attr(pipe, model)
    if not hasattr(type(pipe), "save_lora_weights"):
        raise NotImplementedError(
            f"{type(pipe).__name__} has no diffusers LoRA loader (save_lora_weights/load_lora_weights): "
            "the adapter could not be loaded back with diffusers"
        )
    had_adapters = bool(getattr(model, "peft_config", None))
    was_training = model.training
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval().requires_grad_(False)

    calls = record_teacher_calls(
        pipe, prompts, pag_scale, guidance_scale, layers, perturbation, num_inference_steps, seed, call_kwargs
    )
    if not calls:
        raise RuntimeError(f"{type(pipe).__name__} made no denoiser call: nothing to distil")
    teacher_targets(model, calls, pag_scale, guidance_scale, layers, perturbation)
    before = unguided_loss(calls, model)

    config = LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights=True,
        target_modules=list(target_modules),
    )  # fmt: skip
    model.add_adapter(config, adapter_name=adapter_name)  # type: ignore[operator]
    model.set_adapter(adapter_name)  # type: ignore[operator]
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    result = LoraDistillResult(Path(out_dir), weight_name, adapter_name, calls=len(calls), loss_before=before)
    try:
        model.train()
        for _ in tqdm(range(steps), desc="distil PAG into LoRA", unit="step", disable=not progress):
            call = calls[int(torch.randint(len(calls), (1,), generator=g))]
            pred = first_tensor(model(*call.args, **call.kwargs)).float()
            assert call.target is not None
            loss = torch.nn.functional.mse_loss(pred, call.target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            result.losses.append(float(loss.detach()))
        model.eval()
        result.loss_after = unguided_loss(calls, model)
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=adapter_name))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        type(pipe).save_lora_weights(str(out_dir), **{f"{attr}_lora_layers": state}, weight_name=weight_name)
        info = {
            "pag_scale": pag_scale,
            "guidance_scale": guidance_scale,
            "layers": layers,
            "perturbation": perturbation,
            "rank": rank,
            "alpha": alpha if alpha is not None else rank,
            "target_modules": list(target_modules),
            "steps": steps,
            "lr": lr,
            "prompts": len(prompts),
            "recorded_calls": len(calls),
            "num_inference_steps": num_inference_steps,
            "loss_before": result.loss_before,
            "loss_after": result.loss_after,
        }
        (Path(out_dir) / (Path(weight_name).stem + ".json")).write_text(json.dumps(info, indent=2) + "\n")
    finally:
        if not keep_adapter:  # no adapter layers left behind (unless the model had adapters of its own)
            if had_adapters:
                model.delete_adapters([adapter_name])  # type: ignore[operator]
            else:
                model.unload_lora()  # type: ignore[operator]
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, False))
        model.train(was_training)
    return result


def unguided_loss(calls: Sequence[RecordedCall], model: nn.Module) -> float:
    """The mean MSE of ``model`` (as it is: with or without an adapter) to the recorded calls' targets."""
    from pagkit.batch import first_tensor

    total = 0.0
    with torch.no_grad():
        for call in calls:
            assert call.target is not None
            total += float(torch.nn.functional.mse_loss(first_tensor(model(*call.args, **call.kwargs)), call.target))
    return total / max(len(calls), 1)
