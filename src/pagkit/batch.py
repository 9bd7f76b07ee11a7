"""Row operations over the nested arguments of a model call (tensors in dicts, lists and tuples).

A tensor whose leading dimension equals the batch size is batch-indexed; anything else (scalars, shared
tensors, flags) passes through unchanged.
"""

from __future__ import annotations

from typing import Any

import torch


def map_rows(tree: Any, batch: int, fn: Any) -> Any:
    """Apply ``fn`` to every batch-indexed tensor in ``tree`` (a nest of dicts, lists and tuples)."""
    if isinstance(tree, torch.Tensor):
        return fn(tree) if tree.ndim > 0 and tree.shape[0] == batch else tree
    if isinstance(tree, dict):
        return {k: map_rows(v, batch, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        items = [map_rows(v, batch, fn) for v in tree]
        return type(tree)(items) if not hasattr(tree, "_fields") else type(tree)(*items)
    return tree


def append_rows(tree: Any, batch: int, index: torch.Tensor) -> Any:
    """Append copies of rows ``index`` to every batch-indexed tensor: ``[B, ...] -> [B + len(index), ...]``."""
    return map_rows(tree, batch, lambda t: torch.cat([t, t[index.to(t.device)]]))


def repeat_rows(tree: Any, batch: int, times: int) -> Any:
    """Stack ``times`` copies of the batch: ``[B, ...] -> [times * B, ...]``."""
    return map_rows(tree, batch, lambda t: torch.cat([t] * times))


def concat_trees(trees: list[Any], batch: int) -> Any:
    """Concatenate same-structured trees along the batch (each tree's batch-indexed tensors have ``batch`` rows)."""
    first = trees[0]
    if isinstance(first, torch.Tensor):
        if first.ndim > 0 and first.shape[0] == batch:
            return torch.cat(trees)
        return first
    if isinstance(first, dict):
        return {k: concat_trees([t[k] for t in trees], batch) for k in first}
    if isinstance(first, (list, tuple)):
        items = [concat_trees([t[i] for t in trees], batch) for i in range(len(first))]
        return type(first)(items) if not hasattr(first, "_fields") else type(first)(*items)
    return first


ROTARY_KEYS = frozenset({"image_rotary_emb", "rotary_emb", "freqs_cis"})


def shared_rotary(key: str, value: Any) -> bool:
    """Whether input ``key`` is a rotary table without a batch axis (``[S, D]`` tensors, or a tuple of them): it is
    shared by every row and never split or copied as rows, whatever ``S`` is."""
    leaves = value if isinstance(value, (tuple, list)) else (value,)
    return key in ROTARY_KEYS and all(isinstance(t, torch.Tensor) and t.ndim <= 2 for t in leaves)


def first_tensor(output: Any) -> torch.Tensor:
    """The prediction in a diffusers model output (``.sample``, a tuple's first item, or a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the prediction tensor in a model output of type {type(output).__name__}")


def replace_first_tensor(output: Any, value: torch.Tensor) -> Any:
    """The same output object with its prediction replaced by ``value``."""
    if isinstance(output, torch.Tensor):
        return value
    if hasattr(output, "sample"):
        output.sample = value
        return output
    return type(output)([value, *output[1:]])
