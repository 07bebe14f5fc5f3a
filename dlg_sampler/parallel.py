"""Several processes (``accelerate launch``): per-process seeds and the CPU choice."""

from __future__ import annotations

import os

import numpy as np
import torch


def process_seed(seed: int, rank: int, world: int) -> int:
    """The seed of process ``rank`` of ``world``: the run seed itself for one process, else a distinct seed derived
    from ``(seed, rank)`` (numpy's ``SeedSequence``), so every process owns different, reproducible randomness."""
    if world == 1:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def cpu_processes(device: str | None) -> bool:
    """Run on the CPU: asked for, or launched as several processes (``WORLD_SIZE > 1``) on a machine without CUDA
    (accelerate then joins the processes with gloo, as ``accelerate launch --multi_gpu`` on CPUs needs)."""
    return device == "cpu" or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
