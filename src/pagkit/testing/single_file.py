"""A Stable Diffusion 1.x pipeline written as an original single-file checkpoint (the LDM / CompVis key layout).

:func:`sd15_checkpoint` renames a ``StableDiffusionPipeline``'s U-Net, VAE and CLIP text encoder state dicts to the
keys of an original SD 1.x ``.ckpt``/``.safetensors`` file: ``model.diffusion_model.*`` (``input_blocks``,
``middle_block``, ``output_blocks``), ``first_stage_model.*`` (``encoder.down.I.block.J``, ``decoder.up.I`` in
reverse order, 1x1-conv attention) and ``cond_stage_model.transformer.text_model.*``. diffusers'
``infer_diffusers_model_type`` reads such a file as ``v1`` and its ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint`` and ``convert_ldm_clip_checkpoint`` map it back, so tests can load a checkpoint
through ``from_single_file`` without downloading one. Only what SD 1.x U-Nets and KL VAEs hold is renamed; any other
key (class or added-condition embeddings, ...) is a ``KeyError``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["save_sd15_checkpoint", "sd15_checkpoint"]

UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    first, _, leaf = rest.partition(".")
    return f"{UNET_RESNET[first]}.{leaf}"


def unet_key(key: str, layers_per_block: int, up_attention: set[int]) -> str:
    """The LDM name of a diffusers ``UNet2DConditionModel`` key. Each down block holds ``layers_per_block`` layers
    (resnet ``.0`` + attention ``.1``) then its downsampler; each up block one layer more, the upsampler sitting
    after the last layer's resnet (``.1``) or resnet and attention (``.2``, blocks in ``up_attention``)."""
    step = layers_per_block + 1
    name, _, leaf = key.rpartition(".")
    if name in UNET_TOP:
        return f"{UNET_TOP[name]}.{leaf}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        side, block, kind, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        index = block * step + layer + (1 if side == "down" else 0)  # input_blocks.0 is conv_in
        where = "input_blocks" if side == "down" else "output_blocks"
        return f"{where}.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"{where}.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        block = int(m[1])
        return f"output_blocks.{block * step + layers_per_block}.{2 if block in up_attention else 1}.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    raise KeyError(f"no SD 1.x LDM name for the U-Net key {key!r}")


def vae_key(key: str, num_up_blocks: int) -> str:
    """The LDM name of a diffusers ``AutoencoderKL`` key (the decoder's up blocks are numbered from the bottom)."""
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)", key):
        inner = f"block.{m[3]}" if m[2] == "resnets" else "downsample"
        return f"encoder.down.{m[1]}.{inner}.{m[4].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)", key):
        inner = f"block.{m[3]}" if m[2] == "resnets" else "upsample"
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.{inner}.{m[4].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
    if re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.\w+|(post_)?quant_conv\.\w+", key):
        return key
    raise KeyError(f"no SD 1.x LDM name for the VAE key {key!r}")


def sd15_checkpoint(pipe: Any) -> dict[str, Any]:
    """``pipe``'s U-Net, VAE and text encoder weights under the keys of an original SD 1.x checkpoint (copies)."""
    unet, vae = pipe.unet, pipe.vae
    per_block = unet.config.layers_per_block
    up_attention = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    out: dict[str, Any] = {}
    for key, tensor in unet.state_dict().items():
        out["model.diffusion_model." + unet_key(key, per_block, up_attention)] = tensor
    for key, tensor in vae.state_dict().items():
        name = vae_key(key, len(vae.config.up_block_types))
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", name):
            tensor = tensor[:, :, None, None]  # the original attention projections are 1x1 convolutions
        out["first_stage_model." + name] = tensor
    for key, tensor in pipe.text_encoder.state_dict().items():
        # transformers >= 5.6 flattens CLIPTextModel (no text_model. prefix); the original file has it
        out["cond_stage_model.transformer." + (key if key.startswith("text_model.") else "text_model." + key)] = tensor
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def save_sd15_checkpoint(pipe: Any, path: str | Path) -> Path:
    """Write :func:`sd15_checkpoint` of ``pipe`` to ``path`` as safetensors; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(sd15_checkpoint(pipe), str(path))
    return path
