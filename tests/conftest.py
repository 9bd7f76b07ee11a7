"""Shared test set-up: one torch thread (the machine has two cores), tiny components from ``tiny.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))
