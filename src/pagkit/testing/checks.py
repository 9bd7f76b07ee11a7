"""The checks every pipeline family must pass with PAG (tests/test_family_guidance.py, scripts/support_matrix.py).

Each check builds the family's tiny pipeline (:mod:`pagkit.testing.families`) and raises ``AssertionError`` with
a reason when it fails. The reference for the perturbed branch is written independently of the engine: the
model is run directly, with the chosen layers' attention replaced by a dense computation (identity map for
self-attention; for joint attention the image-image block replaced by the identity through a dense mask).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from pagkit.testing.families import Family

SCALE = 2.0
SEEDS = (0, 1)
# where the text tokens sit in joint attention, per family (read from diffusers' sources, for the reference)
TEXT_FIRST = {"flux", "flux-kontext", "flux-true-cfg", "chroma", "qwenimage", "qwenimage-true-cfg", "cogvideox"}
TEXT_FIRST |= {"auraflow", "lumina2", "deepfloyd-if"}
# processors that join the layer's input and the encoder states into one attention sequence
JOINING_PROCESSORS = {"HunyuanVideoAttnProcessor2_0", "CogVideoXAttnProcessor2_0", "MochiAttnProcessor2_0"}


def output_array(result: Any) -> np.ndarray:
    """The images/frames/latents of a pipeline result as a float array."""
    for attr in ("images", "frames", "latents"):
        value = getattr(result, attr, None)
        if value is not None:
            break
    else:
        value = result[0] if isinstance(result, (tuple, list)) else result
    if isinstance(value, list):
        value = np.stack([np.asarray(v) for v in value])
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def denoiser(pipe: Any, fam: Family) -> nn.Module:
    model = getattr(pipe, fam.denoiser)
    assert isinstance(model, nn.Module)
    return model


def run(pipe: Any, fam: Family, seeds: tuple[int, ...] = SEEDS, cfg: bool | None = None) -> np.ndarray:
    from pagkit.testing.families import without_cfg

    call = fam.call if cfg is None or cfg == fam.cfg else without_cfg(fam.name)
    assert call is not None
    with torch.no_grad():
        return output_array(pipe(**call(seeds)))


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything apply_guidance may touch: parameters and buffers, processors, hooks, instance attributes."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    processors = {n: id(getattr(m, "processor", None)) for n, m in model.named_modules()}
    hooks = {
        n: (len(m._forward_pre_hooks), len(m._forward_hooks), sorted(m.__dict__.keys()))
        for n, m in model.named_modules()
    }
    return {"state": state, "processors": processors, "hooks": hooks}


def assert_same_snapshot(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["processors"] == b["processors"], "attention processors not restored"
    assert a["hooks"] == b["hooks"], "hooks or instance attributes not restored"
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), f"parameter {key} changed"


def check_runs_changes_scale0(pipe: Any, fam: Family) -> None:
    import pagkit

    plain = run(pipe, fam)
    with pagkit.apply_pag(pipe, scale=0.0, layers=fam.layers):
        zero = run(pipe, fam)
    assert np.array_equal(plain, zero), "scale 0 is not bit-identical to the plain pipeline"
    with pagkit.apply_pag(pipe, scale=SCALE, layers=fam.layers):
        guided = run(pipe, fam)
    assert np.isfinite(guided).all(), "guided output is not finite"
    assert np.abs(guided - plain).max() > 1e-6, "PAG did not change the output"


def check_restored(pipe: Any, fam: Family) -> None:
    import pagkit

    model = denoiser(pipe, fam)
    before = snapshot(model)
    with pagkit.apply_pag(pipe, scale=SCALE, layers=fam.layers):
        run(pipe, fam)
    assert_same_snapshot(before, snapshot(model))
    calls = []

    def boom(module: nn.Module, args: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted mid-sampling")

    hook = model.register_forward_pre_hook(boom)
    before = snapshot(model)
    try:
        with contextlib.suppress(RuntimeError), pagkit.apply_pag(pipe, scale=SCALE, layers=fam.layers):
            run(pipe, fam)
    finally:
        hook.remove()
    after = snapshot(model)
    assert len(calls) >= 2, "the pipeline made fewer than two denoiser calls"
    before["hooks"] = {n: (a - (n == "") * 1, b, c) for n, (a, b, c) in before["hooks"].items()}
    assert_same_snapshot(before, after)
    with pagkit.apply_pag(pipe, scale=SCALE, layers=fam.layers):  # applies again: nothing was left behind
        run(pipe, fam)


def check_seed_independence(pipe: Any, fam: Family) -> None:
    import pagkit

    with pagkit.apply_pag(pipe, scale=SCALE, layers=fam.layers):
        a = run(pipe, fam, (0, 1))
        b = run(pipe, fam, (0, 2))
    np.testing.assert_allclose(a[0], b[0], atol=1e-5, err_msg="image 0 depends on image 1's seed")
    assert np.abs(a[1] - b[1]).max() > 1e-6, "image 1 does not depend on its seed"


# -- Eq. 8 in every call, against an independent reference ---------------------------------------------------
class _DenseReference(TorchFunctionMode):
    """Attention with the identity map on every row (self), or the image-image block only (joint, dense mask)."""

    def __init__(self, text: int, text_first: bool) -> None:
        super().__init__()
        self.text = text
        self.text_first = text_first

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask")
        a = dict(zip(names, args, strict=False))
        a.update(kwargs)
        q, k, v = a.pop("query"), a.pop("key"), a.pop("value")
        nq, nk = q.shape[-2], k.shape[-2]
        if v.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        if self.text == 0:
            assert nq == nk, "reference: self-attention with different query and key lengths"
            return v
        t = self.text
        is_text_k = torch.zeros(nk, dtype=torch.bool)
        if self.text_first:
            is_text_k[:t] = True
        else:
            is_text_k[nk - t :] = True
        is_text_q = is_text_k if nq == nk else torch.zeros(nq, dtype=torch.bool)
        img_k = (~is_text_k).nonzero().squeeze(1)
        allowed = is_text_k[None, :] | is_text_q[:, None]
        img_q = (~is_text_q).nonzero().squeeze(1)
        allowed[img_q, img_k[: len(img_q)]] = True  # image query i keeps its own image key
        mask = allowed.to(q.device)
        user = a.pop("attn_mask", None)
        if user is not None and user.dtype == torch.bool:
            mask = mask & user
        elif user is not None:  # an additive mask: kept where allowed, -inf elsewhere
            mask = user.masked_fill(~mask, float("-inf"))
        a.pop("enable_gqa", None)
        return func(q, k, v, attn_mask=mask, **a)


def _identity_linear(attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Linear attention (Sana) with the identity map: each token keeps its value."""
    return attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))


@contextlib.contextmanager
def reference_perturbed(model: nn.Module, layers: str, text_first: bool) -> Iterator[None]:
    """The model with ``layers`` (exact module paths) perturbed on every row, independent of pagkit's engine."""
    modules = dict(model.named_modules())
    hooks = []
    image_tokens: list[int] = []
    modes: list[TorchFunctionMode] = []

    def model_pre(module: nn.Module, args: Any, kwargs: Any) -> None:
        from pagkit.integrations.diffusers import image_tokens as count

        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        image_tokens[:] = [count(model, x) or 0]

    def pre(module: nn.Module, args: Any, kwargs: Any, parent_single: bool) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        text = 0
        has_added = getattr(module, "add_k_proj", None) is not None
        joins = type(getattr(module, "processor", None)).__name__ in JOINING_PROCESSORS
        if isinstance(ctx, torch.Tensor) and ctx is not hidden and (has_added or joins):
            text = ctx.shape[1]
        elif hidden.ndim == 3 and image_tokens and image_tokens[0] and hidden.shape[1] > image_tokens[0]:
            text = hidden.shape[1] - image_tokens[0]
        first = text_first and type(getattr(module, "processor", None)).__name__ != "JointAttnProcessor2_0"
        mode = _DenseReference(text, first)
        mode.__enter__()
        modes.append(mode)

    def post(module: nn.Module, args: Any, output: Any) -> None:
        modes.pop().__exit__(None, None, None)

    hooks.append(model.register_forward_pre_hook(model_pre, with_kwargs=True))
    swapped = []
    for name in layers.split(","):
        module = modules[name]
        if type(getattr(module, "processor", None)).__name__ == "SanaLinearAttnProcessor2_0":
            swapped.append((module, module.processor))
            module.processor = _identity_linear
            continue
        parent = modules.get(name.rsplit(".", 1)[0])
        single = parent is not None and "Single" in type(parent).__name__
        hooks.append(module.register_forward_pre_hook(lambda m, a, k, s=single: pre(m, a, k, s), with_kwargs=True))
        hooks.append(module.register_forward_hook(post, always_call=True))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for module, processor in swapped:
            module.processor = processor


def _first(output: Any) -> torch.Tensor:
    from pagkit.batch import first_tensor

    return first_tensor(output)


def check_eq8(pipe: Any, fam: Family) -> None:
    """Every denoiser call of a guided run: the rows of each image get the same added term, equal to
    ``s (eps_c - eps_perturbed)`` of that image, with ``eps_perturbed`` from the independent reference."""
    import pagkit

    model = denoiser(pipe, fam)
    records: list[tuple[Any, Any, torch.Tensor]] = []

    def record_in(module: nn.Module, args: Any, kwargs: Any) -> None:
        records.append((args, dict(kwargs), torch.empty(0)))

    def record_out(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        a, k, _ = records[-1]
        records[-1] = (a, k, _first(output).detach().clone())

    with pagkit.apply_pag(pipe, scale=SCALE, layers=fam.layers):
        # registered after pagkit's hooks: sees the pipeline's inputs (before) and the guided output (after)
        h1 = model.register_forward_pre_hook(record_in, with_kwargs=True, prepend=True)
        h2 = model.register_forward_hook(record_out, with_kwargs=True)
        try:
            run(pipe, fam)
        finally:
            h1.remove()
            h2.remove()
    assert records, "no denoiser call recorded"
    text_first = fam.name in TEXT_FIRST
    groups: dict[tuple[float, bytes], list[torch.Tensor]] = {}
    matched: dict[tuple[float, bytes], bool] = {}
    unc_expected: dict[tuple[float, bytes], torch.Tensor | None] = {}
    with torch.no_grad():
        for args, kwargs, guided in records:
            if kwargs.get("skip_layers") is not None:
                continue
            plain = _first(model(*args, **kwargs))
            with reference_perturbed(model, fam.layers, text_first):
                pert = _first(model(*args, **kwargs))
            sample = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
            t = args[1] if len(args) > 1 else kwargs.get("timestep")
            tv = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
            delta = guided - plain
            for r in range(guided.shape[0]):
                row = sample[r]
                if fam.name == "svd":  # [F, 2C, H, W]: noisy latents, then the image latents (zero when unconditional)
                    row = row[:, : row.shape[1] // 2]
                key = (tv, row.detach().float().numpy().tobytes())
                groups.setdefault(key, []).append(delta[r])
                expected = SCALE * (plain[r] - pert[r])
                hit = bool(torch.allclose(delta[r], expected, atol=2e-4 * max(1.0, float(expected.abs().max()))))
                matched[key] = matched.get(key, False) or hit
                if float(delta[r].abs().max()) == 0.0:  # the conditional row of an unconditional-only fold
                    unc_expected[key] = expected
    for key, deltas in groups.items():
        same = all(torch.allclose(d, deltas[0], atol=2e-4, rtol=1e-3) for d in deltas[1:])
        if same:
            assert matched[key], "no row of this image got s (eps_c - eps_perturbed) of the reference"
            continue
        # the unconditional-only fold (the pipeline reuses its conditional prediction): the conditional row gets
        # nothing, the unconditional one s (eps_c - eps_p) / (1 - w), so the CFG combination adds s (eps_c - eps_p)
        w = float(pipe.guidance_scale)
        zero = [d for d in deltas if float(d.abs().max()) == 0.0]
        rest = [d for d in deltas if float(d.abs().max()) != 0.0]
        assert len(deltas) == 2 and len(zero) == 1, "rows of one image got different terms"
        assert unc_expected.get(key) is not None
        torch.testing.assert_close(rest[0] * (1.0 - w), unc_expected[key], atol=5e-4, rtol=1e-3)


CHECKS = {
    "runs, changes, scale 0 identical": check_runs_changes_scale0,
    "restored (context, exception)": check_restored,
    "image i independent of seed j": check_seed_independence,
    "Eq. 8 in every call (reference)": check_eq8,
}
