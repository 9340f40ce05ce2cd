"""clip_pl: distributed CLIP pretraining with PyTorch Lightning."""

from typing import Any

from clip_pl.model import CLIP, CLIPConfig, create_model, list_models
from data_pipelines.tokenizer import Tokenizer

__all__ = ["CLIP", "CLIPConfig", "Tokenizer", "create_model", "list_models", "load"]


def __getattr__(name: str) -> Any:
    # Imported on first use: model files bring Lightning (the checkpoint IO plugins), which building a
    # model does not need.
    if name == "load":
        from clip_pl.model_files.load import load

        return load
    raise AttributeError(f"module 'clip_pl' has no attribute {name!r}")
