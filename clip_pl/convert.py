"""``python -m clip_pl.convert``: an OpenAI/OpenCLIP ViT image encoder as timm trunk weights.

The trunk weights are what ``model.image.weights`` in the training config reads::

    python -m clip_pl.convert open_clip_model.safetensors trunk.safetensors --model vit_b32

The mapping is ``clip_pl.model_files.convert``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from safetensors.torch import save_file

from clip_pl.model import ImageTower, get_model_config
from clip_pl.model_files.convert import convert_openclip_image_tower, read_weights_file
from data_pipelines.atomic import atomic_output
from data_pipelines.errors import USER_ERRORS, report_user_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clip_pl.convert",
        description="Convert an OpenAI/OpenCLIP ViT image encoder into timm trunk weights for model.image.weights.",
    )
    parser.add_argument("weights", help="OpenCLIP/OpenAI state dict (.safetensors, .bin or .pt)")
    parser.add_argument("output", help="trunk weights to write (.safetensors)")
    parser.add_argument("--model", default="vit_b32", help="clip_pl model name whose image tower receives them")
    parser.add_argument("--image-size", type=int, default=None, help="resample position embeddings to this size")
    args = parser.parse_args(argv)
    try:
        overrides = {"image": {"image_size": args.image_size}} if args.image_size else {}
        config = get_model_config(args.model, **overrides)
        # Only the tower's shapes are needed: building it on the meta device skips the random init.
        with torch.device("meta"):
            tower = ImageTower(config.image, config.embed_dim)
        converted = convert_openclip_image_tower(read_weights_file(args.weights), tower)
    except USER_ERRORS as e:
        return report_user_error(e)
    trunk = {k[len("trunk.") :]: v.contiguous() for k, v in converted.items() if k.startswith("trunk.")}
    with atomic_output(args.output) as tmp:
        save_file(trunk, tmp)
    print(
        f"wrote {args.output}: {len(trunk)} trunk tensors for {tower.config.name!r}. Train with "
        f"model.image.weights={args.output}; the projection (proj) is not included and starts random."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
