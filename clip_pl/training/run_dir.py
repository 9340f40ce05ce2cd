"""What a run directory remembers between runs: the config its weights were trained with, and its final metrics.

A rerun of the same command in the same ``run_dir`` resumes from its ``last.ckpt``. These helpers
decide whether a rerun may resume (only settings that leave the trained weights' provenance intact
may change), and keep the final metrics so a finished run can report them again without training.
Plain dictionaries in, plain dictionaries out: the config system stays with the application.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from data_pipelines.atomic import atomic_output

FINAL_METRICS_FILE = "final_metrics.json"
ABSENT = "(absent)"


def last_checkpoint_path(run_dir: str) -> str:
    """The run's one checkpoint, the newest: ``<run_dir>/checkpoints/last.ckpt``, which a rerun resumes from."""
    return os.path.join(run_dir, "checkpoints", "last.ckpt")


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1, 2]}}`` -> ``{"a.b.0": 1, "a.b.1": 2}``; empty containers are kept as values."""
    if isinstance(config, Mapping) and config:
        items = config.items()
    elif isinstance(config, (list, tuple)) and config:
        items = enumerate(config)
    else:
        return {prefix: config}
    flat = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_changes(
    saved: Mapping[str, Any], new: Mapping[str, Any], may_change: Iterable[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two configs, except those under a ``may_change`` prefix.

    Args:
        saved: The config the run directory holds.
        new: The config of this command.
        may_change: Keys (or key prefixes, e.g. ``"logger"``) a resume may change.

    Returns:
        ``{key: (saved value, new value)}`` sorted by key; ``"(absent)"`` stands for a key one config lacks.
    """
    allowed = tuple(may_change)
    old, now = flatten(saved), flatten(new)
    changed = {}
    for key in sorted(old.keys() | now.keys()):
        if any(key == p or key.startswith(p + ".") for p in allowed):
            continue
        before, after = old.get(key, ABSENT), now.get(key, ABSENT)
        if before != after:
            changed[key] = (before, after)
    return changed


def write_final_metrics(run_dir: str | os.PathLike, step: int, metrics: Mapping[str, float]) -> str:
    """Writes ``run_dir/final_metrics.json``: the metrics of the weights at ``step``. Returns its path."""
    path = os.path.join(run_dir, FINAL_METRICS_FILE)
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump({"step": int(step), "metrics": {k: float(v) for k, v in sorted(metrics.items())}}, f, indent=1)
    return path


def read_final_metrics(run_dir: str | os.PathLike) -> tuple[int, dict[str, float]] | None:
    """``(step, metrics)`` from ``write_final_metrics``, or ``None`` when the run has none."""
    path = os.path.join(run_dir, FINAL_METRICS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    return int(saved["step"]), dict(saved["metrics"])


def format_metrics(step: int, metrics: Mapping[str, float]) -> str:
    """The metrics table printed at the end of a run, under a heading naming the step it describes."""
    rows = [f"{name:40s} {metrics[name]:.4f}" for name in sorted(metrics)]
    return "\n".join([f"Final metrics of the weights at step {step}:", *rows])
