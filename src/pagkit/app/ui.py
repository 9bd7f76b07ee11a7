"""``pagkit ui``: a local Gradio page for PAG on the embedded model or a local diffusers pipeline.

The page has the conditioning (a class for the embedded model and class-conditional pipelines, a prompt and a
negative prompt for text models), the guidance terms with scale sliders (CFG, PAG), a layer picker filled from
:func:`pagkit.list_layers`, extra terms in the spec syntax (``seg:2``, ``pag:1@down.1``), the seed and the steps.
**Generate** shows the unguided and the guided result side by side from the same seed; **Scale sweep** shows the
guided result at each PAG scale of a list. Long work shows Gradio's progress; a bad setting shows its one-line
error in the page (``#status``) and the page keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

PREVIEW = 256  # px: small outputs are scaled up (nearest) to at least this size


def _preview(arr: np.ndarray) -> Image.Image:
    image = Image.fromarray(np.ascontiguousarray(arr))
    scale = max(1, PREVIEW // max(image.size))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    return image


class EmbeddedBackend:
    """The embedded Fashion-MNIST denoiser (or a ``pagkit train`` output): 4 images per setting, 2x2."""

    condition = "class"
    default_steps = 20
    default_cfg = 1.0

    def __init__(self, weights: str | None = None, device: str = "auto") -> None:
        from pagkit.app.loading import resolve_device
        from pagkit.data import CLASS_NAMES
        from pagkit.layers import list_layers
        from pagkit.models.unet import load_denoiser

        unet, config = load_denoiser(weights)
        self.model = (unet.to(resolve_device(device)), config)
        self.title = "embedded Fashion-MNIST model" if weights is None else f"denoiser {weights}"
        self.layers = [layer.name for layer in list_layers(unet)]
        self.default_layers = [n for n in self.layers if n.startswith("mid_block.")] or self.layers[:1]
        self.classes = ["none", *(f"{i} {name}" for i, name in enumerate(CLASS_NAMES))]
        self.layer_labels = {layer.name: layer.describe() for layer in list_layers(unet)}

    def run(self, spec: str, cond: dict[str, Any], seed: int, steps: int) -> Image.Image:
        from pagkit.generate import generate, parse_label
        from pagkit.viz import grid

        label = str(cond.get("class") or "none").split(" ")[0]
        images, _ = generate(
            4, steps=steps, seed=seed, label=parse_label(label), guidance=spec, model=self.model, progress=True
        )
        tiles = grid(images, ncols=2, pad=2, scale=1)
        return _preview(np.repeat(tiles[..., None], 3, axis=-1))


class PipelineBackend:
    """A local diffusers pipeline: one image (a video's first frame) per setting."""

    default_steps = 20

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto", config: str | None = None) -> None:
        from pagkit.app import loading
        from pagkit.integrations.diffusers import denoiser_of
        from pagkit.layers import list_layers

        self.pipe = loading.load_pipeline(path, device, dtype, config)
        self.info = loading.describe(self.pipe)
        loading.check_servable(self.pipe, self.info)
        self.title = f"{self.info.name} from {path}"
        self.condition = self.info.condition
        model, _ = denoiser_of(self.pipe)
        found = list_layers(model)
        self.layers = [layer.name for layer in found]
        self.layer_labels = {layer.name: layer.describe() for layer in found}
        from pagkit.app.run import default_layers
        from pagkit.layers import select_layers

        self.default_layers = [layer.name for layer in select_layers(model, default_layers(model))] if found else []
        self.classes = [str(i) for i in range(int(getattr(model.config, "num_embeds_ada_norm", None) or 10))]
        self.default_cfg = 4.0 if self.info.cfg_param == "guidance_scale" else 1.0

    def run(self, spec: str, cond: dict[str, Any], seed: int, steps: int) -> Image.Image:
        from pagkit.app.run import Inputs, check_inputs, plan, run

        if self.condition == "class":
            label = cond.get("class")
            inputs = Inputs(class_label=int(str(label).split(" ")[0]) if label not in (None, "none") else None)
        elif self.condition == "prompt":
            inputs = Inputs(prompt=cond.get("prompt") or "", negative_prompt=cond.get("negative_prompt") or None)
        else:
            inputs = Inputs()
        inputs.steps = steps
        check_inputs(self.info, inputs)
        self.pipe.set_progress_bar_config(disable=False)
        media = run(self.pipe, plan(self.pipe, spec, inputs, self.info), inputs, [seed], self.info)
        return _preview(media[0, 0] if media.ndim == 5 else media[0])


Backend = EmbeddedBackend | PipelineBackend


def build_backend(
    model: str | None, device: str = "auto", dtype: str = "auto", config: str | None = None
) -> EmbeddedBackend | PipelineBackend:
    if model is None:
        return EmbeddedBackend(device=device)
    return PipelineBackend(model, device, dtype, config)


def guidance_spec(cfg: float, pag: float, layers: Sequence[str] | None, extra: str | None) -> str:
    """The spec the page's controls describe: ``cfg:W+pag:S@[layers]+extra`` (``none`` when nothing is on)."""
    terms = []
    if cfg is not None and float(cfg) != 1.0:
        terms.append(f"cfg:{float(cfg):g}")
    if pag is not None and float(pag) != 0.0:
        if not layers:
            raise ValueError("PAG is on but no layer is picked: pick at least one layer (or set the PAG scale to 0)")
        terms.append(f"pag:{float(pag):g}@[{','.join(layers)}]")
    if extra and extra.strip():
        terms.append(extra.strip())
    return "+".join(terms) or "none"


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"sweep scales {text!r}: give numbers separated by commas, e.g. 0,1,2,3,5") from None
    if not scales or len(scales) > 12:
        raise ValueError(f"sweep scales {text!r}: give 1 to 12 numbers separated by commas, e.g. 0,1,2,3,5")
    return scales


def _error(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"**Error:** {text}"


def build_page(backend: EmbeddedBackend | PipelineBackend) -> Any:
    """The Gradio Blocks page on ``backend`` (not launched)."""
    import gradio as gr

    with gr.Blocks(title="pagkit: perturbed-attention guidance") as page:
        gr.Markdown(
            f"## pagkit: perturbed-attention guidance\nModel: **{backend.title}**. The left image is unguided, the "
            "right one guided, from the same seed."
        )
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(
                    label="Prompt", value="a photo of a cat", visible=backend.condition == "prompt", elem_id="prompt"
                )
                negative = gr.Textbox(label="Negative prompt", value="", visible=backend.condition == "prompt")
                klass = gr.Dropdown(
                    backend.classes,
                    value=backend.classes[0],
                    label="Class",
                    visible=backend.condition == "class",
                    elem_id="class",
                )
                cfg = gr.Slider(1.0, 10.0, value=backend.default_cfg, step=0.5, label="CFG scale (1: off)")
                pag = gr.Slider(0.0, 10.0, value=3.0, step=0.5, label="PAG scale (0: off)", elem_id="pag")
                layers = gr.Dropdown(
                    [(backend.layer_labels[n], n) for n in backend.layers],
                    value=backend.default_layers,
                    multiselect=True,
                    label="PAG layers (list_layers)",
                    elem_id="layers",
                )
                extra = gr.Textbox(
                    label="Extra guidance terms (spec syntax, e.g. seg:2 or pag:1@down.1)",
                    value="",
                    elem_id="extra",
                )
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
                    steps = gr.Slider(1, 100, value=backend.default_steps, step=1, label="Steps")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    sweep_go = gr.Button("Scale sweep", elem_id="sweep")
                scales = gr.Textbox(label="Sweep PAG scales", value="0,1,2,3,5", elem_id="scales")
            with gr.Column(scale=2):
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    unguided = gr.Image(label="unguided", type="pil", elem_id="unguided", interactive=False)
                    guided = gr.Image(label="guided", type="pil", elem_id="guided", interactive=False)
                gallery = gr.Gallery(label="PAG scale sweep", columns=5, elem_id="gallery", visible=True)

        def conditioning(prompt_v: str, negative_v: str, class_v: str) -> dict[str, Any]:
            return {"prompt": prompt_v, "negative_prompt": negative_v, "class": class_v}

        def on_generate(
            prompt_v: str,
            negative_v: str,
            class_v: str,
            cfg_v: float,
            pag_v: float,
            layers_v: list[str],
            extra_v: str,
            seed_v: float,
            steps_v: float,
            progress: Any = gr.Progress(track_tqdm=True),
        ) -> tuple[Any, Any, str]:
            try:
                spec = guidance_spec(cfg_v, pag_v, layers_v, extra_v)
                cond = conditioning(prompt_v, negative_v, class_v)
                s, n = int(seed_v or 0), int(steps_v)
                progress(0.0, desc="unguided")
                left = backend.run("none", cond, s, n)
                progress(0.5, desc=spec)
                right = backend.run(spec, cond, s, n)
            except Exception as e:
                return None, None, _error(e)
            return left, right, f"Guided: `{spec}` (seed {s}, {n} steps)"

        def on_sweep(
            prompt_v: str,
            negative_v: str,
            class_v: str,
            cfg_v: float,
            pag_v: float,
            layers_v: list[str],
            extra_v: str,
            seed_v: float,
            steps_v: float,
            scales_v: str,
            progress: Any = gr.Progress(track_tqdm=True),
        ) -> tuple[Any, str]:
            try:
                values = parse_scales(scales_v)
                cond = conditioning(prompt_v, negative_v, class_v)
                s, n = int(seed_v or 0), int(steps_v)
                items = []
                for i, value in enumerate(values):
                    spec = guidance_spec(cfg_v, value, layers_v, extra_v)
                    progress(i / len(values), desc=spec)
                    items.append((backend.run(spec, cond, s, n), spec))
            except Exception as e:
                return None, _error(e)
            return items, f"Sweep over PAG scales {', '.join(f'{v:g}' for v in values)} (seed {s})"

        controls = [prompt, negative, klass, cfg, pag, layers, extra, seed, steps]
        go.click(on_generate, controls, [unguided, guided, status])
        sweep_go.click(on_sweep, [*controls, scales], [gallery, status])
    return page
