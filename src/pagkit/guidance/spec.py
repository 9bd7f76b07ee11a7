"""The one guidance spec syntax of ``pagkit sample --guidance``, ``pagkit eval --configs`` and the library.

A spec is ``none`` or terms joined by ``+``; each term is ``METHOD[:SCALE]`` followed by modifiers::

    @LAYERS        layers or blocks (a layer spec; several: @[down.1,mid])
    /OPTION        the method's option: name:value, or a bare value for its main option
    ~SCHEDULE      constant, interval:A:B (fractions of the run), interval-sigma:HI:LO, linear, cosine
    %K             the cached contribution: weak branches recomputed every K-th step

Examples: ``cfg:3+pag:2``, ``seg:3``, ``slg:3@blocks.4``, ``tpg:3``, ``auto:2``, ``apg:4``, ``cfgzero:4+pag:2``,
``pag:3~interval-sigma:0.3:5`` (the bounds of an interval in sigma may come in either order),
``headpag:2/heads:[0,1]``, ``seg:2/sigma:10``, ``pag:2/soft:0.5``, ``rescale:5/phi:0.7``.

A missing scale takes the method's default (:data:`METHODS`, listed by ``pagkit guidance``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagkit.guidance.schedules import Schedule, parse_schedule


class SpecError(ValueError):
    """A guidance spec cannot be parsed or names something the method does not take."""


@dataclass(frozen=True)
class Method:
    """One guidance method of the spec syntax."""

    name: str
    summary: str
    paper: str
    scale: float
    layers: str | None = None  # default layer spec (None: the method takes no layers)
    options: dict[str, Any] = field(default_factory=dict)  # option -> default (the first is the bare one)
    schedule: str | None = None  # default schedule
    kind: str = "weak"  # weak (a weak branch), cfg (a CFG combine rule), sag
    off: float = 0.0  # the scale that turns the method off

    def default_text(self) -> str:
        parts = [f"scale {self.scale:g}"]
        if self.layers:
            parts.append(f"layers {self.layers}")
        parts += [f"{k} {v}" for k, v in self.options.items()]
        if self.schedule:
            parts.append(f"schedule {self.schedule}")
        return ", ".join(parts)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "cfg",
            "classifier-free guidance, eps_u + w (eps_c - eps_u)",
            "Ho & Salimans 2022, arXiv 2207.12598",
            2.0,
            kind="cfg",
            off=1.0,
        ),
        Method(
            "pag",
            "perturbed-attention guidance: identity attention map in chosen layers",
            "Ahn et al. 2024, arXiv 2403.17377",
            2.0,
            "mid",
            {"perturbation": "identity"},
        ),
        Method(
            "softpag",
            "PAG with the map interpolated toward the identity, (1-a) P + a I",
            "Ahn et al. 2024 (ablation)",
            2.0,
            "mid",
            {"alpha": 0.5},
        ),
        Method(
            "headpag",
            "PAG on chosen attention heads of the chosen layers only",
            "Ahn et al. 2024 (head-level variant)",
            2.0,
            "mid",
            {"heads": "0"},
        ),
        Method(
            "seg",
            "smoothed energy guidance: queries Gaussian-blurred over the token grid (inf: uniform)",
            "Hong 2024, arXiv 2408.00760",
            2.0,
            "mid",
            {"sigma": math.inf},
        ),
        Method(
            "slg",
            "skip-layer guidance: chosen blocks (blocks.N) or attention layers skipped, in a window",
            "SD3.5 / Hyung et al. 2024, arXiv 2411.18664",
            2.0,
            "mid",
            {},
            "interval:0.01:0.2",
        ),
        Method(
            "stg",
            "spatiotemporal skip guidance: slg over the whole run",
            "Hyung et al. 2024, arXiv 2411.18664",
            2.0,
            "mid",
            {},
            None,
        ),
        Method(
            "tpg",
            "token perturbation guidance: tokens of chosen layers' hidden states shuffled",
            "Rajabi et al. 2025, arXiv 2506.10036",
            2.0,
            "mid",
            {"seed": 0},
        ),
        Method(
            "auto",
            "autoguidance: guide away from a weaker model of the same family (w = 1 + s)",
            "Karras et al. 2024, arXiv 2406.02507",
            1.0,
            None,
            {"weights": "embedded"},
        ),
        Method(
            "sag",
            "self-attention guidance: blur where the attention map looks, re-noise, guide away",
            "Hong et al. 2023, arXiv 2210.00939",
            0.75,
            "mid",
            {"blur": 1.0},
            kind="sag",
        ),
        Method(
            "apg",
            "adaptive projected guidance: CFG's update without its part parallel to D_c (eta)",
            "Sadat et al. 2024, arXiv 2410.02416",
            4.0,
            None,
            {"eta": 0.0, "r": 0.0, "space": "x0", "momentum": 0.0},
            kind="cfg",
            off=1.0,
        ),
        Method(
            "cfgzero",
            "CFG-Zero*: CFG against the unconditional prediction times its optimized scale",
            "Fan et al. 2025, arXiv 2503.18886",
            2.0,
            kind="cfg",
            off=1.0,
        ),
        Method(
            "cfgpp",
            "CFG++: x0 from eps_u + l (eps_c - eps_u), DDIM renoised with eps_u (l in [0, 1])",
            "Chung et al. 2024, arXiv 2406.08070",
            0.6,
            kind="cfg",
            off=1.0,
        ),
        Method(
            "rescale",
            "CFG rescaled toward the conditional prediction's std (phi)",
            "Lin et al. 2023, arXiv 2305.08891",
            3.0,
            None,
            {"phi": 0.7},
            kind="cfg",
            off=1.0,
        ),
    )
}

_TERM = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_-]*)(?::(?P<scale>[^@/~%]+))?(?P<mods>.*)$")
_MOD = re.compile(r"(?P<op>[@/~%])(?P<arg>(?:\[[^\]]*\]|[^@/~%\[])+)")


def split_outside(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside square brackets."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


@dataclass
class TermSpec:
    """One parsed term: the method, scale, layers, options and schedule (before any model is loaded)."""

    method: Method
    scale: float
    layers: str | None
    options: dict[str, Any]
    schedule: Schedule | None
    reuse: int = 1
    schedule_text: str | None = None

    def text(self) -> str:
        out = f"{self.method.name}:{self.scale:g}"
        if self.layers and self.layers != self.method.layers:
            out += f"@[{self.layers}]" if "," in self.layers else f"@{self.layers}"
        for k, v in self.options.items():
            if v != self.method.options.get(k):
                out += f"/{k}:{v}"
        if self.schedule_text:
            out += f"~{self.schedule_text}"
        return out


@dataclass
class GuidanceSpec:
    """A parsed spec: its terms, in order, and the cached-contribution period."""

    text: str
    terms: list[TermSpec]

    @property
    def reuse_delta(self) -> int:
        return max([t.reuse for t in self.terms] or [1])

    @property
    def needs_uncond(self) -> bool:
        return any(t.method.kind == "cfg" and t.scale != t.method.off for t in self.terms)

    def build(self) -> list[Any]:
        """The terms as objects (loads autoguidance's weak model)."""
        return [build_term(t) for t in self.terms]


def _number(text: str, what: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SpecError(f"{where}: {what} must be a number, got {text!r}") from None
    if math.isnan(value):
        raise SpecError(f"{where}: {what} must be a number, got {text!r}")
    return value


def _option(method: Method, arg: str, where: str) -> tuple[str, str]:
    if not method.options:
        raise SpecError(f"{where}: {method.name} takes no options (/...)")
    if method.name == "pag":  # the perturbation spec keeps its own colon: pag:3/soft:0.5
        return "perturbation", arg
    name, sep, value = arg.partition(":")
    if sep and name in method.options:
        return name, value
    if sep and not name.replace(".", "").replace("-", "").isdigit() and name not in ("inf",):
        raise SpecError(f"{where}: {method.name} has no option {name!r}; its options: {', '.join(method.options)}")
    return next(iter(method.options)), arg


def parse_term(text: str, where: str) -> TermSpec:
    m = _TERM.match(text.strip())
    if not m:
        raise SpecError(f"{where}: cannot parse {text!r}")
    name = m.group("name").lower()
    method = METHODS.get(name)
    if method is None:
        raise SpecError(
            f"{where}: unknown guidance {name!r}; use one of {', '.join(METHODS)} (pagkit guidance lists them)"
        )
    scale = method.scale if m.group("scale") is None else _number(m.group("scale"), f"{name}'s scale", where)
    if math.isinf(scale):
        raise SpecError(f"{where}: {name}'s scale must be finite")
    layers = method.layers
    options = dict(method.options)
    schedule: Schedule | None = None
    schedule_text = None
    reuse = 1
    mods = m.group("mods")
    pos = 0
    for mod in _MOD.finditer(mods):
        if mod.start() != pos:
            break
        pos = mod.end()
        op, arg = mod.group("op"), mod.group("arg").strip()
        if op == "@":
            if method.layers is None:
                raise SpecError(f"{where}: {name} takes no layers (@...)")
            layers = ",".join(s.strip() for s in arg.strip("[]").split(",") if s.strip())
            if not layers:
                raise SpecError(f"{where}: empty layer spec after @")
        elif op == "/":
            key, value = _option(method, arg, where)
            options[key] = value.strip("[]") if isinstance(value, str) else value
        elif op == "~":
            schedule, schedule_text = _schedule(arg, where), arg
        else:
            if not arg.isdigit() or int(arg) < 1:
                raise SpecError(f"{where}: %K (recompute the weak branches every K-th step) needs an integer K >= 1")
            reuse = int(arg)
    if pos != len(mods):
        raise SpecError(f"{where}: cannot parse {mods[pos:]!r} (use @layers, /option, ~schedule, %K)")
    if schedule is None and method.schedule is not None:
        schedule = parse_schedule(method.schedule)
    for key in ("sigma", "alpha", "eta", "r", "phi", "blur"):
        if key in options:
            options[key] = _number(str(options[key]), f"{name}'s {key}", where)
    if "seed" in options:
        options["seed"] = int(_number(str(options["seed"]), f"{name}'s seed", where))
    return TermSpec(method, scale, layers, options, schedule, reuse, schedule_text)


def _schedule(arg: str, where: str) -> Schedule:
    name, *bounds = arg.split(":")
    if name == "interval-sigma" and len(bounds) == 2:
        try:
            lo, hi = sorted((float(bounds[0]), float(bounds[1])))
        except ValueError:
            raise SpecError(f"{where}: bad schedule {arg!r}: bounds must be numbers") from None
        arg = f"interval-sigma:{hi}:{lo}"
    try:
        return parse_schedule(arg)
    except ValueError as e:
        raise SpecError(f"{where}: {e}") from e


def parse_guidance(text: str) -> GuidanceSpec:
    """Parse a spec (see the module docstring); no model is loaded."""
    text = str(text).strip()
    where = f"guidance {text!r}"
    if not text:
        raise SpecError("empty guidance spec: give e.g. pag:2, cfg:3+pag:2 or none")
    if text.lower() in ("none", "unguided"):
        return GuidanceSpec("none", [])
    terms = [parse_term(part, where) for part in split_outside(text, "+")]
    rules = [t.method.name for t in terms if t.method.kind == "cfg"]
    if len(rules) > 1:
        raise SpecError(f"{where}: {' and '.join(rules)} are both CFG rules: give one (each replaces CFG's combine)")
    if sum(t.method.kind == "sag" for t in terms) > 1:
        raise SpecError(f"{where}: give sag at most once")
    return GuidanceSpec(text, terms)


def _sched(t: TermSpec) -> dict[str, Any]:
    return {} if t.schedule is None else {"schedule": t.schedule}


def build_term(t: TermSpec) -> Any:
    """The term object of a parsed term."""
    from pagkit.guidance import family, rules_cfg
    from pagkit.guidance.sag import SAG
    from pagkit.guidance.terms import CFG, PAG

    o, name = t.options, t.method.name
    builders: dict[str, Callable[[], Any]] = {
        "cfg": lambda: CFG(t.scale, **_sched(t)),
        "pag": lambda: PAG.make(t.scale, t.layers or "mid", str(o["perturbation"]), t.schedule),
        "softpag": lambda: family.SoftPAG(t.scale, t.layers or "mid", float(o["alpha"]), t.schedule),
        "headpag": lambda: family.HeadPAG(t.scale, t.layers or "mid", o["heads"], **_sched(t)),
        "seg": lambda: family.SEG(t.scale, t.layers or "mid", float(o["sigma"]), **_sched(t)),
        "slg": lambda: family.SLG(t.scale, t.layers or "mid", **_sched(t)),
        "stg": lambda: family.SLG(t.scale, t.layers or "mid", **({"schedule": t.schedule or Schedule()})),
        "tpg": lambda: family.TPG(t.scale, t.layers or "mid", int(o["seed"]), **_sched(t)),
        "auto": lambda: family.AutoGuidance(t.scale, o["weights"], **_sched(t)),
        "sag": lambda: SAG.make(t.scale, t.layers or "mid", float(o["blur"]), t.schedule),
        "apg": lambda: rules_cfg.APG(
            t.scale, float(o["eta"]), float(o["r"]), str(o["space"]), momentum=float(o["momentum"]), **_sched(t)
        ),
        "cfgzero": lambda: rules_cfg.CFGZeroStar(t.scale, **_sched(t)),
        "cfgpp": lambda: rules_cfg.CFGPP(t.scale, **_sched(t)),
        "rescale": lambda: rules_cfg.RescaledCFG(t.scale, float(o["phi"]), **_sched(t)),
    }
    try:
        return builders[name]()
    except SpecError:
        raise
    except ValueError as e:
        raise SpecError(f"{name}: {e}") from e


def terms_of(spec: str | GuidanceSpec) -> list[Any]:
    """The term objects of a spec string."""
    parsed = parse_guidance(spec) if isinstance(spec, str) else spec
    return parsed.build()


def describe() -> str:
    """One line per method: name, what it does, its paper and its defaults (``pagkit guidance``)."""
    width = max(len(n) for n in METHODS)
    lines = []
    for m in METHODS.values():
        lines.append(f"{m.name:<{width}}  {m.summary}  [{m.paper}; default {m.default_text()}]")
    return "\n".join(lines)


def guidance_terms(spec: str, labels: Any, sampler: str = "ddim") -> tuple[list[Any], int]:
    """The terms of ``spec`` for :func:`pagkit.generate.generate` and the cached-contribution period; a clear
    error where the run lacks what a method needs (class labels for CFG rules, DDIM for CFG++)."""
    import numpy as np

    parsed = parse_guidance(spec)
    if parsed.needs_uncond and (np.asarray(labels) < 0).any():
        rules = ", ".join(t.method.name for t in parsed.terms if t.method.kind == "cfg")
        raise SpecError(
            f"{rules} combines the conditional and unconditional predictions, so it needs a class label: give "
            "--label 0..9 (pagkit eval: --label-mode uniform), or drop it for unconditional sampling"
        )
    if sampler != "ddim" and any(t.method.name == "cfgpp" and t.scale != t.method.off for t in parsed.terms):
        raise SpecError("cfgpp renoises the DDIM step with the unconditional prediction: use --sampler ddim")
    return parsed.build(), parsed.reuse_delta
