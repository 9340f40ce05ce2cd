"""clip_pl: distributed CLIP pretraining with PyTorch Lightning."""

from clip_pl.api import load
from clip_pl.model import CLIP, CLIPConfig, create_model, list_models
from clip_pl.tokenizer import Tokenizer

__all__ = ["CLIP", "CLIPConfig", "Tokenizer", "create_model", "list_models", "load"]
