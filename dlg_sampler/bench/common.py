"""What the bench's modules share, below them all: the scheduler a ``SCHEDULERS`` label names, JSON files written
whole, and class proportions (the digits workload and the model reference's convergence check score with them)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .registry import SCHEDULERS


def make_scheduler(label: str, config: dict[str, Any]):
    """Scheduler ``label`` of ``SCHEDULERS`` on the model's training schedule with ``timestep_spacing="trailing"``,
    so its schedule starts at the top level (vanilla runs start at sigma_max, as DLG's warm-up does)."""
    import diffusers

    name, overrides = SCHEDULERS[label]
    return getattr(diffusers, name).from_config({**config, "timestep_spacing": "trailing", **overrides})


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def class_proportions(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``labels [N]`` -> proportions ``[num_classes]`` (float64)."""
    return torch.bincount(labels, minlength=num_classes).double() / len(labels)
