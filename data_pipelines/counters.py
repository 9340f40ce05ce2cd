"""Skip counters shared between DataLoader workers and the main process.

Each worker adds to its own row of a shared-memory tensor, so no lock is needed and the main process
reads the totals at any time, also with persistent workers (a plain attribute would only change in
the worker's copy).
"""

from __future__ import annotations

import torch
from torch.utils.data import get_worker_info

from data_pipelines.samples import SKIP_KINDS


class SkipCounters:
    """Per-worker counts of skipped samples, by reason (see ``SKIP_KINDS``).

    Args:
        num_workers: DataLoader workers that will write (0 means the main process).
    """

    def __init__(self, num_workers: int):
        self.table = torch.zeros(max(1, num_workers), len(SKIP_KINDS), dtype=torch.int64).share_memory_()

    def add(self, kind: str) -> None:
        info = get_worker_info()
        self.table[0 if info is None else info.id, SKIP_KINDS.index(kind)] += 1

    def totals(self) -> dict[str, int]:
        """Counts summed over workers, by reason."""
        return dict(zip(SKIP_KINDS, self.table.sum(dim=0).tolist(), strict=False))
