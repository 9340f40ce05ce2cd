"""clip_pl: distributed CLIP pretraining with PyTorch Lightning."""

from typing import Any

from clip_pl.model import CLIP, CLIPConfig, create_model, list_models
from data_pipelines.tokenizer import Tokenizer

__all__ = ["CLIP", "CLIPConfig", "Tokenizer", "create_model", "list_models", "load"]


def __getattr__(name: str) -> Any:
    # clip_pl.loading imports clip_pl.export; imported with the package, `python -m clip_pl.export`
    # would find its module loaded already and warn (runpy's RuntimeWarning).
    if name == "load":
        from clip_pl.loading import load

        return load
    raise AttributeError(f"module 'clip_pl' has no attribute {name!r}")
