"""Find a model's self-attention layers and resolve a layer spec to exactly the layers it names.

A spec is a comma-separated list (or a list) of items, each one of:

- an exact module path (``mid_block.attentions.0``, ``down_blocks.1.attentions.0.transformer_blocks.0.attn1``);
- a block path that selects every self-attention layer inside it (``down_blocks.2``, ``transformer_blocks.13``),
  matched on whole dotted components, so ``blocks.1`` never selects ``blocks.10``;
- a short preset: ``mid``, ``down.I``, ``up.I``, ``down.I.J`` / ``up.I.J`` (block I, attention J), ``blocks.I``;
- a paper preset: ``paper:sd15``, ``paper:sdxl``, ``paper:sd3``, ``paper:pixart``, ``paper:adm`` (the layers used
  in Ahn et al.; see the reference sheet), or ``all``;
- a regular expression, only when asked for explicitly: ``re:<pattern>`` (full match on module paths).

A spec that selects nothing, or names a cross-attention layer, raises :class:`LayerSpecError` listing the valid
self-attention layers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn


class LayerSpecError(ValueError):
    """A layer spec matches nothing, or names a layer that is not self-attention."""


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of a model: its path, kind and (where known) token-grid resolution."""

    name: str
    kind: str  # "self", "cross", "joint" or "single"
    module: nn.Module = field(repr=False, compare=False)
    resolution: int | None = None

    def describe(self) -> str:
        res = f"{self.resolution}x{self.resolution}" if self.resolution else "?"
        return f"{self.name}  [{self.kind}, {res}]"


PERTURBABLE = ("self", "joint", "single")
# text-only refiners (their self-attention sees prompt tokens only: nothing for PAG to perturb)
TEXT_ONLY_BLOCKS = frozenset({"context_refiner", "token_refiner"})
# processors that join the layer's input with the encoder states into one attention sequence
JOINING_PROCESSORS = frozenset({"CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0"})
# blocks whose attention runs over one sequence of text and image tokens, by block class: the container of those
# blocks (Lumina2's image-only noise_refiner uses the same block class)
UNIFIED_BLOCKS = {"Lumina2TransformerBlock": "layers"}


def _kind(name: str, module: nn.Module, parent: nn.Module | None) -> str | None:
    """``self``, ``cross``, ``joint`` (text and image streams with their own projections, attending jointly) or
    ``single`` (one stream of text and image tokens, as in Flux's single blocks); None: not attention."""
    if not (hasattr(module, "processor") and hasattr(module, "to_v")):
        return None
    if any(part in TEXT_ONLY_BLOCKS for part in name.split(".")):
        return "text"
    if getattr(module, "add_k_proj", None) is not None or getattr(module, "add_v_proj", None) is not None:
        return "joint"
    if type(getattr(module, "processor", None)).__name__ in JOINING_PROCESSORS:
        return "joint"
    if parent is not None and "Single" in type(parent).__name__:
        return "single"
    if parent is not None and name.split(".")[0] == UNIFIED_BLOCKS.get(type(parent).__name__):
        return "single"
    cross = getattr(module, "is_cross_attention", None)
    if cross and type(parent).__name__ == "Kandinsky3AttentionBlock":
        # Kandinsky 3 builds its image self-attention with cross_attention_dim = channels and calls it with the
        # input itself as context; a layer that really gets text raises at run time
        cross = getattr(module, "cross_attention_dim", None) != getattr(module, "query_dim", None)
    if cross is None:  # the AttentionModuleMixin classes that do not say: diffusers names text cross-attention attn2
        cross = name.rsplit(".", 1)[-1] == "attn2"
    return "cross" if cross else "self"


def _resolution(model: nn.Module, name: str) -> int | None:
    """Token-grid side of a layer, from the model's config (U-Nets: per block level; DiTs: patches)."""
    config = getattr(model, "config", None)
    size = getattr(config, "sample_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    if not isinstance(size, int):
        return None
    parts = name.split(".")
    levels = len(getattr(config, "block_out_channels", ()) or ())
    if levels and parts[0] in ("down_blocks", "up_blocks", "mid_block"):
        if parts[0] == "mid_block":
            return size // 2 ** (levels - 1)
        i = int(parts[1])
        return size // 2 ** (i if parts[0] == "down_blocks" else levels - 1 - i)
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, int) and patch > 0:
        return size // patch
    return None


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """Every attention module of ``model`` (diffusers ``Attention`` and its kin), in module order."""
    out = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
        kind = _kind(name, module, parent)
        if kind is not None:
            out.append(AttentionLayer(name, kind, module, _resolution(model, name)))
    return out


def list_layers(model: nn.Module) -> list[AttentionLayer]:
    """The layers PAG can perturb: self-attention, joint (MMDiT) and single-stream attention layers."""
    return [layer for layer in attention_layers(model) if layer.kind in PERTURBABLE]


def _within(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


def _preset(item: str, model: nn.Module, names: Sequence[str]) -> list[str] | None:
    """Expand a short or paper preset into block paths, or None if ``item`` is not a preset."""
    down, up = "down_blocks", "up_blocks"
    if item == "all":
        return [""]
    if item == "mid":
        return ["mid_block"]
    m = re.fullmatch(r"(down|up)\.(\d+)(?:\.(\d+))?", item)
    if m:
        block = f"{down if m.group(1) == 'down' else up}.{m.group(2)}"
        return [block if m.group(3) is None else f"{block}.attentions.{m.group(3)}"]
    m = re.fullmatch(r"blocks\.(\d+)", item)
    if m and any(_within(n, f"transformer_blocks.{m.group(1)}") for n in names):
        return [f"transformer_blocks.{m.group(1)}"]
    if item.startswith("paper:"):
        which = item[len("paper:") :]
        n_down = len(getattr(getattr(model, "config", None), "block_out_channels", ()) or ())
        presets = {
            "sd15": ["mid_block"],
            "sdxl": ["mid_block"],
            "sd3": ["transformer_blocks.13"],
            "pixart": ["transformer_blocks.14"],
            # ADM ImageNet-256 perturbs the lowest-resolution input blocks and the middle block
            "adm": [f"{down}.{n_down - 1}", "mid_block"] if n_down else [],
        }
        if which not in presets:
            raise LayerSpecError(
                f"unknown paper preset {item!r}: use one of {', '.join('paper:' + k for k in presets)}"
            )
        return presets[which]
    return None


def _spec_items(spec: str | Iterable[str]) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [i.strip() for i in items if i and i.strip()]
    if not items:
        raise LayerSpecError("empty layer spec: name at least one layer, block or preset (e.g. 'mid')")
    return items


def select_layers(model: nn.Module, spec: str | Iterable[str]) -> list[AttentionLayer]:
    """Resolve ``spec`` to the self-/joint-attention layers it names, in model order, without duplicates."""
    every = attention_layers(model)
    valid = [layer for layer in every if layer.kind in PERTURBABLE]
    if not valid:
        raise LayerSpecError(
            f"{type(model).__name__} has no self-attention layers, so PAG cannot perturb it "
            "(it needs a model with self-attention, e.g. a U-Net with attention blocks or a DiT)"
        )
    names = [layer.name for layer in every]
    chosen: dict[str, AttentionLayer] = {}
    for item in _spec_items(spec):
        if item.startswith("re:"):
            try:
                pattern = re.compile(item[3:])
            except re.error as e:
                raise LayerSpecError(f"bad regular expression in {item!r}: {e}") from e
            hits = [layer for layer in valid if pattern.fullmatch(layer.name)]
        else:
            blocks = _preset(item, model, names) or [item]
            exact_cross = [layer for layer in every if layer.kind not in PERTURBABLE and layer.name in blocks]
            if exact_cross:
                raise LayerSpecError(
                    f"{item!r} names a {exact_cross[0].kind}-attention layer ({exact_cross[0].name}); PAG perturbs "
                    "self-attention (or the image part of joint attention). " + _valid_list(valid)
                )
            hits = [layer for layer in valid if any(b == "" or _within(layer.name, b) for b in blocks)]
        if not hits:
            raise LayerSpecError(f"layer spec {item!r} matches no self-attention layer. " + _valid_list(valid))
        for layer in hits:
            chosen.setdefault(layer.name, layer)
    order = {layer.name: i for i, layer in enumerate(valid)}
    return sorted(chosen.values(), key=lambda layer: order[layer.name])


def _valid_list(valid: Sequence[AttentionLayer], limit: int = 40) -> str:
    shown = "\n  ".join(layer.describe() for layer in valid[:limit])
    more = f"\n  ... and {len(valid) - limit} more" if len(valid) > limit else ""
    return f"Valid self-attention layers:\n  {shown}{more}"
