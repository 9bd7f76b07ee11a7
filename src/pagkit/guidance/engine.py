"""The guidance engine: one mechanism, generic over terms, for our own loop and for diffusers pipelines.

Around one denoiser call whose rows are declared (which rows are conditional), the engine appends one copy of
the conditional rows per weak branch that must run at this step (Ahn et al. Eq. 8: the perturbed branch uses
the conditional input), marks those rows for their branch's intervention, and after the call splits the output
into named predictions. Terms then combine them into contributions (:class:`~pagkit.guidance.term.Term`).

What lives here and not in a term: zero-weight skipping (a term whose scheduled weight is 0 adds no rows), the
cached contribution (``reuse_delta = k``: weak branches run every k-th step), and prefix sharing (up to the first
intervened module the weak branches equal the conditional one: :mod:`pagkit.prefix`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import Token
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pagkit.batch import append_rows, concat_trees, first_tensor, map_rows, shared_rotary
from pagkit.guidance.delta import DeltaCache
from pagkit.guidance.schedules import Step
from pagkit.guidance.term import COND, UNCOND, Term
from pagkit.interventions.base import Intervention
from pagkit.interventions.rows import _CURRENT, BatchLayoutError, CallRows
from pagkit.prefix import PrefixCache, PrefixDedup, sharing_mode


@dataclass(frozen=True)
class WeakBranch:
    """A branch with an intervention, bound to the engine: ``key`` marks its rows."""

    term: int
    name: str
    intervention: Intervention
    key: int


@dataclass
class StepPlan:
    """What one step computes: each term's weight, the weak branches to run, the contributions reused."""

    step: Step
    weights: list[float]
    run: list[WeakBranch]
    reused: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return any(w != 0.0 for w in self.weights)


@dataclass
class _Call:
    plan: StepPlan
    batch: int
    cond_rows: torch.Tensor
    token: Token[CallRows | None] | None
    args: Any = None
    kwargs: Any = None


def _check_image_embeds(kwargs: Mapping[str, Any], batch: int) -> None:
    """IP-Adapter image embeddings (``added_cond_kwargs["image_embeds"]``, a list of ``[B, images, ...]`` tensors)
    get rows like every batch-indexed input; one whose leading dimension is not the call's batch cannot be mapped
    to rows (it would pass through unchanged and meet rows it does not belong to): a clear error instead."""
    added = kwargs.get("added_cond_kwargs")
    embeds = added.get("image_embeds") if isinstance(added, Mapping) else None
    for i, t in enumerate(embeds if isinstance(embeds, (list, tuple)) else [embeds]):
        if isinstance(t, torch.Tensor) and (t.ndim == 0 or t.shape[0] != batch):
            raise BatchLayoutError(
                f"added_cond_kwargs['image_embeds'][{i}] (IP-Adapter) has shape {tuple(t.shape)}, expected {batch} "
                "rows (one per row of the model call); pass ip_adapter_image_embeds as the pipeline documents: per "
                "adapter [2, images, D] under CFG (negative, then positive), [1, images, D] without"
            )


class Guidance:
    """Terms bound to one model: installs their interventions and runs their branches around model calls."""

    def __init__(
        self,
        model: nn.Module,
        terms: Sequence[Term],
        prefix_sharing: bool | str = True,
        reuse_delta: int = 1,
    ) -> None:
        self.model = model
        self.terms = list(terms)
        for term in self.terms:
            if not isinstance(term, Term):
                raise TypeError(f"not a guidance term: {term!r} (use pagkit.CFG, pagkit.PAG, ... or a Term subclass)")
        self.weak: list[WeakBranch] = []
        for i, term in enumerate(self.terms):
            for branch in term.branches():
                if branch.intervention is not None:
                    self.weak.append(WeakBranch(i, branch.name, branch.intervention, len(self.weak)))
        DeltaCache(reuse_delta)  # validate
        self.caches = {
            i: DeltaCache(reuse_delta)
            for i, term in enumerate(self.terms)
            if term.linear and any(w.term == i for w in self.weak)
        }
        targets = [m for w in self.weak for m in w.intervention.targets(model)]
        mode = sharing_mode(prefix_sharing)
        # a branch that forks at the model's input (autoguidance's weak model) shares no prefix
        at_input = any(t is model for t in targets)
        self.dedup = PrefixDedup(model, targets) if mode == "batched" and targets and not at_input else None
        self.replay = PrefixCache(model, targets) if mode == "replay" and targets and not at_input else None
        if self.replay is not None and len(self.weak) > 1:
            raise ValueError("prefix_sharing='replay' serves one weak branch; use the default (batched) layout")
        self._stack: contextlib.ExitStack | None = None
        self._call: _Call | None = None
        self.carry: dict[int, torch.Tensor | None] = {}  # stateful terms' memory within one run
        self._last_index: int | None = None

    # -- installation --------------------------------------------------------------------------------------
    @property
    def installed(self) -> bool:
        return self._stack is not None

    def install(self) -> None:
        """Install every intervention and the prefix-sharing hooks (passive outside a guided call)."""
        if self._stack is not None:
            return
        stack = contextlib.ExitStack()
        try:
            for weak in self.weak:
                stack.enter_context(weak.intervention.install(self.model, weak.key))
            for sharing in (self.dedup, self.replay):
                if sharing is not None:
                    sharing.install()
                    stack.callback(sharing.remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack

    def remove(self) -> None:
        """Restore the model exactly. Safe to call twice."""
        self.abort()
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    @contextlib.contextmanager
    def installed_on_model(self) -> Iterator[Guidance]:
        self.install()
        try:
            yield self
        finally:
            self.remove()

    # -- one step ------------------------------------------------------------------------------------------
    def plan(self, step: Step, rows: int) -> StepPlan:
        """Weights at ``step`` and the weak branches to run for ``rows`` conditional rows."""
        if any(term.stateful for term in self.terms):
            if step.index is None:
                raise ValueError(
                    "a rule with memory across steps (APG's momentum) needs the step index: pagkit's own loop gives "
                    "it; on a bare model pass scheduler=..."
                )
            if self._last_index is None or step.index <= self._last_index:  # a new run starts
                self.carry = {}
            self._last_index = step.index
        weights = [term.scale_at(step) for term in self.terms]
        run: list[WeakBranch] = []
        reused: dict[int, torch.Tensor] = {}
        for i, weight in enumerate(weights):
            if weight == 0.0:
                continue
            cache = self.caches.get(i)
            cached = cache.get(step, rows) if cache is not None else None
            if cached is not None:
                reused[i] = cached
            else:
                run.extend(w for w in self.weak if w.term == i)
        return StepPlan(step, weights, run, reused)

    def needs_uncond(self, plan: StepPlan) -> bool:
        return any(w != 0.0 and i not in plan.reused and self.terms[i].needs_uncond for i, w in enumerate(plan.weights))

    def begin(
        self,
        plan: StepPlan,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        batch: int,
        cond_rows: torch.Tensor,
        image_tokens: int | None = None,
        lazy: Sequence[str] = (),
        folded: Mapping[str, int] | None = None,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Before a model call of ``batch`` rows (``cond_rows`` conditional): the arguments with the weak
        branches' rows appended. ``lazy`` inputs keep the call's rows (cross-attention completes them);
        ``folded`` inputs hold ``f`` rows per image in ``(b f)`` order (e.g. per-frame text states)."""
        if self._stack is None:
            raise RuntimeError("guidance is not installed on the model (call install() first)")
        self.abort()
        n, k = len(cond_rows), len(plan.run)
        call = _Call(plan, batch, cond_rows, token=None, args=args, kwargs=kwargs)
        self._call = call
        if k == 0:
            return args, kwargs
        _check_image_embeds(kwargs, batch)
        if self.replay is not None:  # the main call as it is; record its prefix for the second call
            self.replay.start_recording(batch, cond_rows)
            return args, kwargs
        total = batch + k * n
        masks = {}
        for j, weak in enumerate(plan.run):
            mask = torch.zeros(total, dtype=torch.bool, device=cond_rows.device)
            mask[batch + j * n : batch + (j + 1) * n] = True
            masks[weak.key] = mask
        index = cond_rows.repeat(k)
        call.token = _CURRENT.set(CallRows(total, masks, image_tokens))
        if folded:
            kwargs = dict(kwargs)
            for key, f in folded.items():
                value = kwargs.get(key)
                if isinstance(value, torch.Tensor):
                    if value.shape[0] != batch * f:
                        raise BatchLayoutError(f"{key} has {value.shape[0]} rows, expected {batch} images x {f}")
                    rows = (index[:, None] * f + torch.arange(f, device=index.device)).flatten()
                    kwargs[key] = torch.cat([value, value[rows.to(value.device)]])
        keep = {key for key, v in kwargs.items() if shared_rotary(key, v)}  # shared by every row
        keep |= set(folded or ())  # already completed above
        if self.dedup is None:
            lazy = ()
        else:
            self.dedup.start(batch, index)
        eager = {key: v for key, v in kwargs.items() if key not in lazy and key not in keep}
        rest = {key: v for key, v in kwargs.items() if key in lazy or key in keep}
        return append_rows(args, batch, index), {**append_rows(eager, batch, index), **rest}

    def end(
        self, output: torch.Tensor, forward: Callable[..., Any] | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """After the call: the rows the caller made, and each weak branch's prediction (by key). ``forward``
        runs the model without the caller's hooks (needed for ``prefix_sharing='replay'``)."""
        call, self._call = self._call, None
        if call is None:
            raise RuntimeError("end() without begin()")
        self._reset(call)
        n, k = len(call.cond_rows), len(call.plan.run)
        if k == 0:
            return output, {}
        if self.replay is not None:
            if forward is None:
                raise RuntimeError("replay needs the model's forward")
            take = lambda t: t[call.cond_rows.to(t.device)]  # noqa: E731
            args_p, kwargs_p = map_rows(call.args, call.batch, take), map_rows(call.kwargs, call.batch, take)
            mask = torch.ones(n, dtype=torch.bool, device=call.cond_rows.device)
            token = _CURRENT.set(CallRows(n, {call.plan.run[0].key: mask}))
            try:
                with self.replay.replay():
                    perturbed = first_tensor(forward(*args_p, **kwargs_p))
            finally:
                _CURRENT.reset(token)
            return output, {call.plan.run[0].key: perturbed}
        if output.shape[0] != call.batch + k * n:
            raise BatchLayoutError(f"model returned {output.shape[0]} rows, expected {call.batch + k * n}")
        main = output[: call.batch]
        preds = {w.key: output[call.batch + j * n : call.batch + (j + 1) * n] for j, w in enumerate(call.plan.run)}
        return main, preds

    def abort(self) -> None:
        """Forget a call that raised (the row marks and prefix state are cleared)."""
        call, self._call = self._call, None
        if call is not None:
            self._reset(call)

    def _reset(self, call: _Call) -> None:
        if call.token is not None:
            _CURRENT.reset(call.token)
            call.token = None
        if self.dedup is not None:
            self.dedup.stop()
        if self.replay is not None:
            self.replay.stop_recording()

    def contribution(
        self,
        plan: StepPlan,
        base: Mapping[str, torch.Tensor],
        weak: Mapping[int, torch.Tensor],
        uncond: bool | None = None,
    ) -> torch.Tensor | None:
        """The sum of every active term's contribution (None if no term is active). ``uncond`` True/False: only
        the terms that do/do not read the unconditional branch (a per-branch pipeline has it one call later)."""
        total: torch.Tensor | None = None
        for i, term in enumerate(self.terms):
            weight = plan.weights[i]
            if weight == 0.0 or (uncond is not None and term.needs_uncond != uncond):
                continue
            if i in plan.reused:
                part = weight * plan.reused[i]
            else:
                preds = dict(base)
                preds.update({w.name: weak[w.key] for w in plan.run if w.term == i})
                cache = self.caches.get(i)
                if term.stateful:
                    part, self.carry[i] = term.combine_carry(preds, weight, self.carry.get(i))
                elif cache is not None:
                    unit = term.combine(preds, 1.0)
                    cache.put(plan.step, unit)
                    part = weight * unit
                else:
                    part = term.combine(preds, weight)
            total = part if total is None else total + part
        return total


class GuidedDenoiser:
    """``denoise(x, t, step) -> eps`` for a diffusers-style model with guidance terms combined (our own loop).

    ``cond`` and ``uncond`` are the model's keyword arguments of the two branches (e.g. ``{"class_labels": y}``),
    their tensors with the batch size of ``x``. The conditional, unconditional (when a term needs it) and weak
    branches run in one batched call. With ``autocast`` the calls run under ``torch.autocast`` and the
    predictions are cast back to ``x``'s dtype before the terms combine them.
    """

    def __init__(
        self,
        model: nn.Module,
        cond: dict[str, Any] | None = None,
        uncond: dict[str, Any] | None = None,
        terms: Sequence[Term] = (),
        prefix_sharing: bool | str = True,
        reuse_delta: int = 1,
        autocast: torch.dtype | None = None,
    ) -> None:
        from pagkit.guidance.sag import SAG

        self.model = model
        self.cond = cond or {}
        self.uncond = uncond
        self.autocast = autocast
        self.sag = [t for t in terms if isinstance(t, SAG)]
        if len(self.sag) > 1:
            raise ValueError("give at most one SAG term")
        self.guidance = Guidance(model, [t for t in terms if not isinstance(t, SAG)], prefix_sharing, reuse_delta)
        if any(t.needs_uncond for t in self.guidance.terms) and uncond is None:
            raise ValueError("CFG needs the unconditional inputs (uncond=...)")
        self.sag_runner = self.sag[0].runner(model) if self.sag else None
        self.last_predictions: dict[str, torch.Tensor] = {}

    @property
    def terms(self) -> list[Term]:
        return [*self.guidance.terms, *self.sag]

    def predictions(self, x: torch.Tensor, t: torch.Tensor | float, step: Step = Step()) -> dict[str, torch.Tensor]:
        """Every branch's prediction at this step, by name (``cond``, ``uncond``, ``<term index>:<branch>``)."""
        base, plan, weak = self._run(x, t, step)
        named = dict(base)
        named.update({f"{w.term}:{w.name}": weak[w.key] for w in plan.run})
        return named

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, step: Step = Step()) -> torch.Tensor:
        """Guided noise prediction ``[B, C, H, W]`` for ``x: [B, C, H, W]`` at timestep ``t``."""
        base, plan, weak = self._run(x, t, step)
        self.last_predictions = base  # read by the sampler's renoising hook (CFG++)
        eps = base[COND]
        preds: dict[str, torch.Tensor] = dict(base)
        if step.sigma is not None:  # for terms that work on the denoised x0 (APG): the sample and its sigma
            preds["x_t"], preds["sigma"] = x, torch.tensor(step.sigma, dtype=x.dtype, device=x.device)
        delta = self.guidance.contribution(plan, preds, weak)
        if delta is not None:
            eps = eps + delta
        if self.sag_runner is not None:
            eps = eps + self.sag_runner.contribution(
                x, t, step, base[COND], lambda xd, td: self._predict(xd, td, **self.cond)
            )
        return eps

    def _run(
        self, x: torch.Tensor, t: torch.Tensor | float, step: Step
    ) -> tuple[dict[str, torch.Tensor], StepPlan, dict[int, torch.Tensor]]:
        b = x.shape[0]
        plan = self.guidance.plan(step, b)
        conds = [self.cond]
        if self.guidance.needs_uncond(plan):
            assert self.uncond is not None
            conds.append(self.uncond)
        k = len(conds)
        t_all = torch.cat([t] * k) if isinstance(t, torch.Tensor) and t.ndim > 0 else t
        args: tuple[Any, ...] = (torch.cat([x] * k), t_all)
        kwargs = concat_trees(conds, b)
        cond_rows = torch.arange(b, device=x.device)
        with contextlib.ExitStack() as stack:
            self.guidance.install()
            stack.callback(self.guidance.remove)
            if self.sag_runner is not None:
                stack.enter_context(self.sag_runner.recording(x, t, step, k * b, cond_rows))
            args, kwargs = self.guidance.begin(plan, args, kwargs, k * b, cond_rows)
            try:
                out = self._predict(*args, **kwargs)
            except BaseException:
                self.guidance.abort()
                raise
            main, weak = self.guidance.end(out, forward=lambda *a, **kw: self._predict(*a, **kw))
        chunks = main.split(b)
        base = {COND: chunks[0]}
        if len(chunks) > 1:
            base[UNCOND] = chunks[1]
        return base, plan, weak

    def _predict(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One model call (under autocast when asked); the prediction in the sample's dtype."""
        x = args[0]
        with torch.autocast(x.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            out = first_tensor(self.model(*args, **kwargs))
        return out.to(x.dtype)
