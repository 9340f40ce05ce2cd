"""Logger construction that survives restarts."""

from __future__ import annotations

import netrc
import os
import uuid

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only


def _wandb_has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def stable_run_id(save_dir: str, filename: str = "wandb_id.txt") -> str:
    """An id stored in the run directory: created by the first run, reused by every resume."""
    path = os.path.join(save_dir, filename)
    if os.path.isfile(path):
        with open(path) as f:
            return f.read().strip()
    run_id = uuid.uuid4().hex[:16]
    # Only rank zero logs, and only it may create the file; other ranks never use the id.
    if rank_zero_only.rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(run_id)
    return run_id


def wandb_logger(save_dir: str, project: str = "clip_pl", name: str | None = None, **kwargs) -> WandbLogger:
    """A WandbLogger that resumes the same run after a restart and goes offline without an API key.

    Args:
        save_dir: The run directory.
        project: wandb project.
        name: Display name of the run.
        **kwargs: Passed to ``WandbLogger``.
    """
    if "WANDB_MODE" not in os.environ and not _wandb_has_api_key():
        os.environ["WANDB_MODE"] = "offline"
    return WandbLogger(
        save_dir=save_dir,
        project=project,
        name=name,
        id=stable_run_id(save_dir),
        resume="allow",
        offline=os.environ.get("WANDB_MODE") == "offline",
        **kwargs,
    )
