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

from clip_pl.checkpoint import CHECKPOINT_KEY, model_state_dict, read_checkpoint
from clip_pl.convert import TOWERS, load_openclip_image_tower, load_tower, read_weights_file
from clip_pl.export import is_safetensors_file, read_exported
from clip_pl.model import CLIP
from data_pipelines.tokenizer import TextTokenizer, tokenizer_from_state_dict

log = logging.getLogger(__name__)

_TOKEN_EMBEDDING = "token_embedding.weight"


def _read_model_file(path: str) -> tuple[dict[str, torch.Tensor], TextTokenizer]:
    """The ``CLIP`` state dict and the tokenizer stored in a ``.ckpt`` or exported ``.safetensors`` file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init.from_checkpoint {path!r} not found")
    if is_safetensors_file(path):
        model, tokenizer = read_exported(path)
        return model.state_dict(), tokenizer
    # A training checkpoint is read directly: rebuilding its model first would cost a random init.
    checkpoint = read_checkpoint(path)
    return model_state_dict(checkpoint), tokenizer_from_state_dict(checkpoint[CHECKPOINT_KEY]["tokenizer"])


def _load_text_tower(
    model: CLIP,
    weights: dict[str, torch.Tensor],
    tokenizer: TextTokenizer,
    theirs: TextTokenizer,
    new_token_embedding: bool,
    path: str,
) -> None:
    if new_token_embedding:
        # The model's own, freshly initialised rows stand in for the pretrained ones.
        weights = {**weights, _TOKEN_EMBEDDING: model.text_tower.token_embedding.weight}
    elif tokenizer.vocabulary() != theirs.vocabulary():
        raise ValueError(
            f"init.from_checkpoint {path!r} was trained with another tokenizer ({theirs.vocab_size} pieces) than "
            f"tokenizer.path ({tokenizer.vocab_size} pieces), so its token embedding rows stand for other tokens; "
            "set init.new_token_embedding=true to load the rest of the text tower with a new token embedding, "
            "or init.towers=[image_tower] to train the text tower from scratch"
        )
    load_tower(model, "text_tower", weights, f"init.from_checkpoint {path!r}")


def _load_from_checkpoint(
    model: CLIP, tokenizer: TextTokenizer, path: str, towers: list[str], new_token_embedding: bool
) -> None:
    state, theirs = _read_model_file(path)
    loaded = []
    for tower in towers:
        prefix = f"{tower}."
        weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if tower == "text_tower":
            _load_text_tower(model, weights, tokenizer, theirs, new_token_embedding, path)
            loaded.append("text_tower (new token_embedding)" if new_token_embedding else "text_tower")
        else:
            load_tower(model, tower, weights, f"init.from_checkpoint {path!r}")
            loaded.append(tower)
    if set(towers) == set(TOWERS):
        with torch.no_grad():
            model.logit_scale.copy_(state["logit_scale"])
            loaded.append("logit_scale")
            if model.logit_bias is not None and "logit_bias" in state:
                model.logit_bias.copy_(state["logit_bias"])
                loaded.append("logit_bias")
    log.info("initialised %s from %s", ", ".join(loaded), path)


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
            ``.pt``) for the image tower, projection included; see ``clip_pl.convert``.
        openclip: A whole OpenAI/OpenCLIP ViT CLIP (hub-style folder, weights file, or OpenAI's
            TorchScript file; see ``clip_pl.openclip_models``): both towers, the logit scale and bias.
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
        from clip_pl.openclip_models import load_openclip_weights

        load_openclip_weights(model, os.fspath(openclip), new_token_embedding=new_token_embedding)
        new = " (new token_embedding)" if new_token_embedding else ""
        log.info("initialised image_tower, text_tower%s and logit_scale from OpenCLIP/OpenAI %s", new, openclip)
    if from_checkpoint is not None:
        _load_from_checkpoint(model, tokenizer, os.fspath(from_checkpoint), towers, new_token_embedding)
    if image_tower is not None:
        load_openclip_image_tower(model, read_weights_file(image_tower))
        log.info("initialised image_tower from OpenCLIP/OpenAI weights %s", image_tower)
