"""Starting a run from pretrained weights: towers of an earlier clip_pl model, or an OpenAI/OpenCLIP model.

``init_from_pretrained`` fills a freshly built model before training; ``train.py`` calls it with the
config's ``init`` block. A new tokenizer (captions in another language, as RuCLIP did) is handled
explicitly: the text tower's token embedding rows stand for the pieces of the tokenizer it was trained
with, so with another tokenizer the embedding cannot be reused, whatever its shape. With
``new_token_embedding=True`` everything else of the text tower is loaded and the token embedding
keeps the model's fresh initialisation, sized for the new tokenizer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from clip_pl.model import CLIP
from clip_pl.model_files.convert import TOWERS, load_openclip_image_tower, load_tower, read_weights_file
from clip_pl.model_files.load import read_model_file
from clip_pl.model_files.openclip_models import load_openclip_weights
from data_pipelines.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

_TOKEN_EMBEDDING = "token_embedding.weight"


def load_towers(
    model: CLIP,
    path: str | os.PathLike,
    towers: Sequence[str] = TOWERS,
    tokenizer: TextTokenizer | None = None,
    new_token_embedding: bool = False,
) -> list[str]:
    """Copies towers of a clip_pl model file (training checkpoint or export) into ``model``.

    For example, start a new run with the image tower of an earlier one:
    ``load_towers(model, "old/last.ckpt", towers=["image_tower"])``.

    Args:
        model: The model to fill.
        path: A training checkpoint (file or sharded folder) or an exported ``.safetensors`` file.
        towers: Which of ``image_tower`` and ``text_tower`` to copy. With both, the learned
            temperature (``logit_scale``) is copied too, and the SigLIP ``logit_bias`` where both
            models have one; with one tower they keep ``model``'s, since they belong to the pair.
        tokenizer: The tokenizer ``model`` will read; if given, a text tower trained with another
            one is refused, since its token embedding rows stand for other tokens.
        new_token_embedding: Copy the text tower except its token embedding, which keeps ``model``'s
            initialisation: the way to reuse a text tower with another tokenizer.

    Returns:
        The names of what was copied, for the log.
    """
    towers = list(towers)
    if not towers or any(t not in TOWERS for t in towers):
        raise ValueError(f"towers must be a non-empty subset of {list(TOWERS)}, got {towers}")
    file = read_model_file(path)
    source = repr(file.path)
    loaded = []
    for tower in towers:
        prefix = f"{tower}."
        weights = {k[len(prefix) :]: v for k, v in file.state_dict.items() if k.startswith(prefix)}
        if not weights:
            raise ValueError(f"{source} has no {tower} weights (keys starting with {prefix!r})")
        if tower == "text_tower" and new_token_embedding:
            # The model's own, freshly initialised rows stand in for the pretrained ones.
            weights[_TOKEN_EMBEDDING] = model.text_tower.token_embedding.weight
        elif tower == "text_tower" and tokenizer is not None and tokenizer.vocabulary() != file.tokenizer.vocabulary():
            raise ValueError(
                f"{source} was trained with another tokenizer ({file.tokenizer.vocab_size} pieces) than this "
                f"model's ({tokenizer.vocab_size} pieces), so its token embedding rows stand for other tokens; "
                "set init.new_token_embedding=true to load the rest of the text tower with a new token embedding, "
                "or init.towers=[image_tower] to train the text tower from scratch"
            )
        load_tower(model, tower, weights, source)
        loaded.append("text_tower (new token_embedding)" if tower == "text_tower" and new_token_embedding else tower)
    if set(towers) == set(TOWERS):
        with torch.no_grad():
            model.logit_scale.copy_(file.state_dict["logit_scale"])
            loaded.append("logit_scale")
            if model.logit_bias is not None and "logit_bias" in file.state_dict:
                model.logit_bias.copy_(file.state_dict["logit_bias"])
                loaded.append("logit_bias")
    return loaded


def init_from_pretrained(
    model: CLIP,
    tokenizer: TextTokenizer,
    from_checkpoint: str | None = None,
    towers: Sequence[str] = TOWERS,
    image_tower: str | None = None,
    openclip: str | None = None,
    new_token_embedding: bool = False,
) -> None:
    """Loads pretrained weights into ``model`` in place; with no file given it does nothing.

    Args:
        model: A freshly built model, its text tower sized for ``tokenizer``.
        tokenizer: The tokenizer this run trains with.
        from_checkpoint: A clip_pl training checkpoint (``.ckpt``) or exported ``.safetensors`` file.
        towers: Which of its ``image_tower`` and ``text_tower`` to load. With both, the learned
            temperature (``logit_scale``) is loaded too, and the SigLIP ``logit_bias`` where both
            models have one; with one tower they start fresh, since they belong to the pair.
        image_tower: An OpenAI/OpenCLIP ViT state dict (``visual.*`` keys; ``.safetensors``, ``.bin`` or
            ``.pt``) for the image tower, projection included; see ``clip_pl.model_files.convert``.
        openclip: A whole OpenAI/OpenCLIP ViT CLIP (hub-style folder, weights file, or OpenAI's
            TorchScript file; see ``clip_pl.model_files.openclip_models``): both towers, the logit scale and bias.
            ``model`` must have its architecture (``model=openclip`` builds it).
        new_token_embedding: Load the text tower of ``from_checkpoint`` or ``openclip`` except its token
            embedding, which keeps the model's initialisation: required when ``tokenizer`` is not the
            one that model was trained with.
    """
    towers = list(towers)
    if from_checkpoint is not None and (not towers or any(t not in TOWERS for t in towers)):
        raise ValueError(f"init.towers must be a non-empty subset of {list(TOWERS)}, got {towers}")
    if image_tower is not None and from_checkpoint is not None and "image_tower" in towers:
        raise ValueError(
            "init.image_tower and init.from_checkpoint both give the image tower; "
            "set init.towers=[text_tower] or init.image_tower=null"
        )
    if openclip is not None and (from_checkpoint is not None or image_tower is not None):
        raise ValueError("init.openclip gives both towers; set init.from_checkpoint and init.image_tower to null")
    if new_token_embedding and from_checkpoint is None and openclip is None:
        raise ValueError(
            "init.new_token_embedding=true loads the text tower of init.from_checkpoint or init.openclip, neither of "
            "which is set: set one, or init.new_token_embedding=false to train the text tower from scratch"
        )
    if openclip is not None:
        if not new_token_embedding and tokenizer.kind != "openclip_bpe":
            raise ValueError(
                f"init.openclip's text tower knows the ids of OpenAI's BPE, not those of this {tokenizer.kind} "
                "tokenizer: set tokenizer=openclip_bpe, or init.new_token_embedding=true to give it a new token "
                "embedding for this tokenizer"
            )
        load_openclip_weights(model, os.fspath(openclip), new_token_embedding=new_token_embedding)
        new = " (new token_embedding)" if new_token_embedding else ""
        log.info("initialised image_tower, text_tower%s and logit_scale from OpenCLIP/OpenAI %s", new, openclip)
    if from_checkpoint is not None:
        if not os.path.exists(from_checkpoint):
            raise FileNotFoundError(f"init.from_checkpoint {os.fspath(from_checkpoint)!r} not found")
        loaded = load_towers(model, from_checkpoint, towers, tokenizer, new_token_embedding)
        log.info("initialised %s from %s", ", ".join(loaded), from_checkpoint)
    if image_tower is not None:
        load_openclip_image_tower(model, read_weights_file(image_tower))
        log.info("initialised image_tower from OpenCLIP/OpenAI weights %s", image_tower)
