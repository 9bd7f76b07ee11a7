"""Guidance configurations to evaluate: parsed from a compact string or a TOML file, mapped to ``generate()``.

String form: configurations separated by commas; each is ``none`` or terms joined by ``+``::

    none, pag:3, sag:0.75, cfg:2, cfg:2+pag:3
    pag:3@mid            PAG on the layers of a layer spec
    pag:1.5@down.2       (several layers: pag:3@[down.2,mid])
    pag:3/blur           a perturbation ablation (identity, soft:0.5, mask, dropout:0.3, blur, pool, noise)
    pag:3~interval:0:0.5 a schedule (constant, interval:A:B, interval-sigma:HI:LO, linear, cosine)
    pag:3%2              the cached-delta mode: PAG's delta recomputed every 2nd step only
    sag:0.75@mid         SAG reading the map of a layer
    distilled:pag:2      the distilled student (pagkit distill) at s = 2: one model call per step
    distilled:cfg:1.25+pag:1   ... with CFG; distilled:none is the student at s = 0

A TOML file holds ``configs = ["none", "pag:3", ...]`` and/or ``[[config]]`` tables::

    [[config]]
    name = "pag-first-half"
    pag = { scale = 3.0, layers = ["mid"], perturbation = "identity", schedule = "interval:0:0.5", reuse_delta = 1 }
    cfg = { scale = 2.0 }
    sag = { scale = 0.75, layer = "mid" }
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from pagkit.defaults import RECOMMENDED

KINDS = ("cfg", "pag", "sag")
DISTILLED = "distilled:"  # prefix: the same guidance from the distilled student (pagkit.distill)


class ConfigError(ValueError):
    """A guidance configuration cannot be parsed."""


@dataclass(frozen=True)
class GuidanceConfig:
    """One guidance configuration: keyword arguments of :func:`pagkit.generate.generate` plus a display name."""

    name: str
    cfg_scale: float = 1.0
    pag_scale: float = 0.0
    pag_layers: str = RECOMMENDED.pag_layers
    perturbation: str = "identity"
    pag_schedule: str | None = None
    reuse_delta: int = 1
    sag_scale: float = 0.0
    sag_layer: str = "mid"
    student: str | None = None  # a distilled student file ("default": the shipped one); None: the model given

    def __post_init__(self) -> None:
        for f in ("cfg_scale", "pag_scale", "sag_scale"):
            if not math.isfinite(getattr(self, f)):
                raise ConfigError(f"config {self.name!r}: {f} must be finite")
        if not (isinstance(self.reuse_delta, int) and self.reuse_delta >= 1):
            raise ConfigError(f"config {self.name!r}: reuse_delta must be an integer >= 1, got {self.reuse_delta!r}")
        from pagkit.attention.ops import make_perturbation
        from pagkit.guidance.schedules import parse_schedule

        try:
            make_perturbation(self.perturbation)
            parse_schedule(self.pag_schedule)
        except ValueError as e:
            raise ConfigError(f"config {self.name!r}: {e}") from e

    def generate_kwargs(self) -> dict[str, Any]:
        """Every guidance argument of ``generate()``, explicitly (its defaults would turn PAG on). A distilled
        config adds the student file and its content digest (so its samples' key changes with the file)."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("name", "student")}
        if self.student is not None:
            from pagkit.distill.student import student_digest

            kwargs["student"] = self.student
            kwargs["student_digest"] = student_digest(self.student)
        return kwargs

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def active(self) -> tuple[str, ...]:
        """The active terms, e.g. ``("cfg", "pag")``."""
        on = {"cfg": self.cfg_scale != 1.0, "pag": self.pag_scale != 0.0, "sag": self.sag_scale != 0.0}
        return tuple(k for k in KINDS if on[k])

    def key(self) -> str:
        """A short hash of the sampling-relevant fields (not the name)."""
        return hashlib.sha256(json.dumps(self.generate_kwargs(), sort_keys=True).encode()).hexdigest()[:10]

    def slug(self) -> str:
        """A file-name-safe form of the name."""
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", self.name).strip("_")[:60] or "config"

    def family(self) -> tuple[str, float] | None:
        """``(family, scale)`` for scale plots: configs with one active term, grouped by all but its scale."""
        if self.student is not None:
            if self.active == ("pag",):
                return "distilled:pag", self.pag_scale
            return None
        if len(self.active) != 1:
            return None
        kind = self.active[0]
        if kind == "cfg":
            return "cfg", self.cfg_scale
        if kind == "sag":
            return f"sag@{self.sag_layer}", self.sag_scale
        family = f"pag@{self.pag_layers}"
        if self.perturbation != "identity":
            family += f"/{self.perturbation}"
        if self.pag_schedule:
            family += f"~{self.pag_schedule}"
        if self.reuse_delta != 1:
            family += f"%{self.reuse_delta}"
        return family, self.pag_scale

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scale(kind: str, text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}: the scale of {kind} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{where}: the scale of {kind} must be finite")
    return value


_TERM = re.compile(r"^(?P<kind>[A-Za-z_]+)(?::(?P<scale>[^@/~%]+))?(?P<mods>.*)$")
_MOD = re.compile(r"(?P<op>[@/~%])(?P<arg>\[[^\]]*\]|[^@/~%]+)")


def _layers(arg: str) -> str:
    return ",".join(s.strip() for s in arg.strip("[]").split(",") if s.strip())


def parse_config(text: str, name: str | None = None) -> GuidanceConfig:
    """One configuration, e.g. ``cfg:2+pag:3@mid/identity~interval:0:0.5``."""
    text = text.strip()
    where = f"config {text!r}"
    if not text:
        raise ConfigError("empty guidance config")
    if text.lower().startswith(DISTILLED):
        rest = text[len(DISTILLED) :]
        inner = parse_config(rest, name)
        if inner.student is not None:
            raise ConfigError(f"{where}: distilled: given twice")
        if inner.sag_scale != 0.0 or inner.reuse_delta != 1 or inner.pag_schedule or inner.perturbation != "identity":
            raise ConfigError(f"{where}: a distilled student takes only cfg:W and pag:S (constant, identity)")
        return replace(inner, name=name or text, student="default")
    if text.lower() in ("none", "unguided"):
        return GuidanceConfig(name or "none")
    spec = spec_config(text, name)  # methods beyond cfg/pag/sag, and their options, in the one spec syntax
    if spec is not None:
        return spec
    kwargs: dict[str, Any] = {}
    seen: set[str] = set()
    for term in _split(text, "+"):
        m = _TERM.match(term.strip())
        if not m:
            raise ConfigError(f"{where}: cannot parse {term!r}")
        kind = m.group("kind").lower()
        if kind not in KINDS:
            raise ConfigError(f"{where}: unknown guidance {kind!r}; use none, {', '.join(KINDS)} (e.g. pag:3)")
        if kind in seen:
            raise ConfigError(f"{where}: {kind} given twice")
        seen.add(kind)
        if m.group("scale") is None:
            raise ConfigError(f"{where}: give {kind}'s scale, e.g. {kind}:{ {'cfg': 2, 'pag': 3, 'sag': 0.75}[kind] }")
        kwargs[f"{kind}_scale"] = _scale(kind, m.group("scale"), where)
        mods = m.group("mods")
        pos = 0
        for mod in _MOD.finditer(mods):
            if mod.start() != pos:
                break
            pos = mod.end()
            op, arg = mod.group("op"), mod.group("arg").strip()
            if op == "@":
                kwargs["pag_layers" if kind == "pag" else "sag_layer"] = _layers(arg)
                if kind == "cfg":
                    raise ConfigError(f"{where}: cfg takes no layers")
            elif kind != "pag":
                raise ConfigError(f"{where}: perturbations (/), schedules (~) and reuse (%) apply to pag only")
            elif op == "%":
                if not arg.isdigit() or int(arg) < 1:
                    raise ConfigError(f"{where}: %k (reuse PAG's delta for k steps) needs an integer k >= 1")
                kwargs["reuse_delta"] = int(arg)
            else:
                kwargs["perturbation" if op == "/" else "pag_schedule"] = arg
        if pos != len(mods):
            raise ConfigError(f"{where}: cannot parse {mods[pos:]!r} (use @layers, /perturbation, ~schedule, %k)")
    return GuidanceConfig(name or text, **kwargs)


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside square brackets (the spec syntax's own splitter)."""
    from pagkit.guidance.spec import split_outside

    return split_outside(text, sep)


def _from_table(table: dict[str, Any], index: int) -> GuidanceConfig:
    unknown = set(table) - {"name", *KINDS}
    if unknown:
        raise ConfigError(f"[[config]] #{index + 1}: unknown keys {sorted(unknown)}; use name, cfg, pag, sag")
    kwargs: dict[str, Any] = {}
    parts = []
    for kind in KINDS:
        spec = table.get(kind)
        if spec is None:
            continue
        spec = {"scale": spec} if isinstance(spec, (int, float)) else dict(spec)
        allowed = {
            "cfg": {"scale"},
            "pag": {"scale", "layers", "perturbation", "schedule", "reuse_delta"},
            "sag": {"scale", "layer"},
        }
        bad = set(spec) - allowed[kind]
        if bad or "scale" not in spec:
            raise ConfigError(f"[[config]] #{index + 1}: {kind} takes {sorted(allowed[kind])} (scale required)")
        kwargs[f"{kind}_scale"] = _scale(kind, str(spec["scale"]), f"[[config]] #{index + 1}")
        parts.append(f"{kind}:{spec['scale']:g}" if isinstance(spec["scale"], (int, float)) else kind)
        if kind == "pag":
            if "layers" in spec:
                layers = spec["layers"]
                kwargs["pag_layers"] = ",".join(layers) if isinstance(layers, list) else str(layers)
            for key, arg in (("perturbation", "perturbation"), ("schedule", "pag_schedule")):
                if key in spec:
                    kwargs[arg] = str(spec[key])
            if "reuse_delta" in spec:
                kwargs["reuse_delta"] = spec["reuse_delta"]
        if kind == "sag" and "layer" in spec:
            layer = spec["layer"]
            kwargs["sag_layer"] = ",".join(layer) if isinstance(layer, list) else str(layer)
    name = str(table.get("name") or "+".join(parts) or "none")
    return GuidanceConfig(name, **kwargs)


def load_toml(path: str | os.PathLike[str]) -> list[GuidanceConfig]:
    """Configurations from a TOML file (``configs = [...]`` strings and/or ``[[config]]`` tables)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError("reading TOML config files needs Python >= 3.11 or `pip install tomli`") from None
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    unknown = set(data) - {"configs", "config"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; use configs = [...] and [[config]]")
    strings = data.get("configs", [])
    if isinstance(strings, str):
        strings = [strings]
    out = [c for s in strings for c in parse_configs(s)]
    out += [_from_table(t, i) for i, t in enumerate(data.get("config", []))]
    return _checked(out, str(path))


def parse_configs(spec: str | os.PathLike[str]) -> list[GuidanceConfig]:
    """A comma-separated list of configurations, or the path of a ``.toml`` file listing them."""
    text = str(spec).strip()
    if text.lower().endswith(".toml"):
        if not Path(text).is_file():
            raise ConfigError(f"config file {text} not found")
        return load_toml(text)
    return _checked([parse_config(part) for part in _split(text, ",") if part.strip()], text)


def _checked(configs: list[GuidanceConfig], where: str) -> list[GuidanceConfig]:
    if not configs:
        raise ConfigError(f"no guidance configs in {where!r}: give e.g. none,pag:3")
    names = [c.name for c in configs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"duplicate config names {dupes} in {where!r}")
    slugs = [c.slug() for c in configs]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"config names in {where!r} collide as file names: {names}")
    return configs


@dataclass(frozen=True)
class SpecConfig(GuidanceConfig):
    """A configuration in the guidance spec syntax (:mod:`pagkit.guidance.spec`): SEG, SLG, TPG, autoguidance,
    APG, CFG-Zero*, CFG++, ... ``generate()`` builds its terms from ``guidance``; the cfg/pag/sag fields stay off."""

    guidance: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        from pagkit.guidance.spec import SpecError, parse_guidance

        try:
            parse_guidance(self.guidance)
        except SpecError as e:
            raise ConfigError(f"config {self.name!r}: {e}") from e

    @property
    def parsed(self) -> Any:
        from pagkit.guidance.spec import parse_guidance

        return parse_guidance(self.guidance)

    @property
    def uses_cfg(self) -> bool:
        return bool(self.parsed.needs_uncond)

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(t.method.name for t in self.parsed.terms if t.scale != t.method.off)

    def family(self) -> tuple[str, float] | None:
        terms = self.parsed.terms
        if len(terms) != 1 or len(self.active) != 1:
            return None
        t = terms[0]
        text = t.text()
        return text.replace(f":{t.scale:g}", "", 1), t.scale


def spec_config(text: str, name: str | None = None) -> SpecConfig | None:
    """A :class:`SpecConfig` for ``text`` when it uses a method or option the cfg/pag/sag fields cannot hold."""
    from pagkit.guidance.spec import SpecError, parse_guidance, split_outside

    parts = [p.strip() for p in split_outside(text, "+")]
    heads = [re.match(r"[A-Za-z][A-Za-z0-9_-]*", p) for p in parts]
    names = [m.group(0).lower() if m else "" for m in heads]
    extra = {"cfg": "[@/~%]", "sag": "[/~%]", "pag": "(?!)"}  # modifiers the cfg/pag/sag fields cannot hold

    def rising(p: str) -> bool:  # interval-sigma:LO:HI (the spec syntax takes either order)
        m = re.search(r"~interval-sigma:([^:~%/@]+):([^:~%/@]+)", p)
        try:
            return m is not None and float(m.group(1)) < float(m.group(2))
        except ValueError:
            return False

    if all(
        n in KINDS and not re.search(extra[n], p[len(n) :]) and not rising(p) for n, p in zip(names, parts, strict=True)
    ):
        return None
    try:
        parse_guidance(text)
    except SpecError as e:
        raise ConfigError(str(e)) from e
    return SpecConfig(name or text, pag_scale=0.0, guidance=text)
