"""Guidance: the term abstraction, the terms (CFG, PAG, SAG), pure rules, schedules and the engine."""

from pagkit.guidance.engine import Guidance, GuidedDenoiser
from pagkit.guidance.rules import cfg_delta, pag_delta
from pagkit.guidance.sag import SAG
from pagkit.guidance.schedules import Schedule, Step, parse_schedule
from pagkit.guidance.term import Branch, Term
from pagkit.guidance.terms import CFG, PAG

__all__ = [
    "CFG",
    "PAG",
    "SAG",
    "Branch",
    "Guidance",
    "GuidedDenoiser",
    "Schedule",
    "Step",
    "Term",
    "cfg_delta",
    "pag_delta",
    "parse_schedule",
]
