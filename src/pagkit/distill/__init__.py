"""Guidance distillation: PAG (and CFG+PAG) at the cost of one forward pass.

- :mod:`pagkit.distill.student`: the student (the embedded U-Net + an embedding of the PAG and CFG scales), its
  file format and a one-call-per-step denoiser for the sampling loop.
- :mod:`pagkit.distill.train`: ``pagkit distill``, the trainer (teacher through pagkit's guidance engine).
- :mod:`pagkit.distill.lora`: distil PAG into a LoRA adapter of a diffusers pipeline's denoiser (peft).

Nothing heavy is imported here: the submodules load torch when used.
"""
