"""Inverse problems with PAG: measurement operators, DPS (Chung et al. 2022) on the embedded pixel model and a
hook for diffusers latent pipelines (PSLD-style), restoration metrics."""

from pagkit.inverse.dps import dps_sample, measurement_gradient, predicted_x0
from pagkit.inverse.operators import (
    TASKS,
    GaussianDeblur,
    Inpaint,
    Operator,
    OperatorError,
    SuperResolution,
    make_operator,
    register,
)
from pagkit.inverse.restore import RESTORE, measure, restore

__all__ = [
    "RESTORE",
    "TASKS",
    "GaussianDeblur",
    "Inpaint",
    "Operator",
    "OperatorError",
    "SuperResolution",
    "dps_sample",
    "make_operator",
    "measure",
    "measurement_gradient",
    "predicted_x0",
    "register",
    "restore",
]
