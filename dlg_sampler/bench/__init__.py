"""``dlg-bench``: DLG against vanilla integrators and diffusers schedulers at equal total NFE, paired by seed.

- :mod:`.registry`: workloads, vanilla samplers, budgets, the chosen DLG point per workload, named DLG configs and
  levers (all data; adding one is one line).
- :mod:`.workloads`: exact Gaussian mixtures and the shipped preset models (digits, photo-digits), with their metrics.
- :mod:`.runs`: one run with every model call counted, the plan, the resumable ``results.jsonl`` store.
- :mod:`.reference`: a preset's model reference (made once, cached, checksummed).
- :mod:`.report`: ``RESULTS.md`` and plots from stored rows.
"""

from .cli import main
from .registry import DEFAULT_DLG, DLG_CONFIGS, LEVERS, SCHEDULERS, WORKLOADS, DLGConfig, Lever

__all__ = ["main", "DEFAULT_DLG", "DLG_CONFIGS", "LEVERS", "SCHEDULERS", "WORKLOADS", "DLGConfig", "Lever"]
