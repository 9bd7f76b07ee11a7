"""Guidance: terms (CFG, PAG, SAG), their pure combine rules, schedules, and the guided-denoiser wrapper."""

from pagkit.guidance.guided import GuidedDenoiser
from pagkit.guidance.rules import cfg_delta, pag_delta
from pagkit.guidance.sag import SAG
from pagkit.guidance.schedules import Schedule, Step, parse_schedule
from pagkit.guidance.terms import CFG, PAG

__all__ = ["CFG", "PAG", "SAG", "GuidedDenoiser", "Schedule", "Step", "cfg_delta", "pag_delta", "parse_schedule"]
