"""Evaluation: guidance configs, resumable/distributed sampling, feature networks, metrics and reports."""

from pagkit.eval.configs import ConfigError, GuidanceConfig, parse_config, parse_configs
from pagkit.eval.metrics import MetricError, MetricSettings, compute_metrics
from pagkit.eval.run import EvalError, EvalSettings, Evaluation, run_eval

__all__ = [
    "ConfigError",
    "EvalError",
    "EvalSettings",
    "Evaluation",
    "GuidanceConfig",
    "MetricError",
    "MetricSettings",
    "compute_metrics",
    "parse_config",
    "parse_configs",
    "run_eval",
]
