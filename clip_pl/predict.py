"""Zero-shot labelling of image files from the command line.

Usage::

    python -m clip_pl.predict --checkpoint model.safetensors --labels "granny smith,ipod,pizza" a.jpg b.jpg
    python -m clip_pl.predict --checkpoint last.ckpt --labels "cat,dog" --templates prompts.txt --json cat.png
    python -m clip_pl.predict --checkpoint /models/ViT-B-32 --labels "cat,dog" cat.png   # OpenCLIP hub folder
    python -m clip_pl.predict --checkpoint weights.bin --openclip-model ViT-B-32 --labels "cat,dog" cat.png

For every image it prints the labels ranked by probability, computed as the model was trained to
score: for a CLIP model a softmax over the temperature-scaled cosine similarities between the image
and each label's prompt embedding; for a SigLIP model (one with a logit bias) each label's own
sigmoid of its scaled similarity plus the bias, so one image's probabilities need not sum to 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from clip_pl.evaluation.zero_shot import build_zero_shot_classifier, resolve_templates
from clip_pl.model import CLIP
from clip_pl.model_files.load import add_model_arguments, load
from data_pipelines.errors import USER_ERRORS, report_user_error
from data_pipelines.tokenizer import Tokenizer

DEFAULT_TEMPLATE = "a photo of a {}."


@torch.no_grad()
def predict(
    model: CLIP,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Tokenizer,
    images: Sequence[Image.Image],
    labels: Sequence[str],
    templates: Sequence[str] = (DEFAULT_TEMPLATE,),
) -> torch.Tensor:
    """Label probabilities ``[len(images), len(labels)]`` (float32, on CPU).

    A CLIP model's rows are a softmax and sum to 1. A SigLIP model (``model.logit_bias`` set) was
    trained to judge every image-text pair on its own, so each entry is that pair's sigmoid: the
    probability that the label fits, independent of the other candidates.

    Args:
        model: A CLIP model in eval mode.
        preprocess: The model's image transform (``clip_pl.load`` returns it).
        tokenizer: The model's tokenizer.
        images: PIL images.
        labels: Candidate labels, each put into every template.
        templates: Prompt templates with a ``{}`` or ``{label}`` placeholder; their embeddings are averaged.
    """
    device = next(model.parameters()).device
    classifier = build_zero_shot_classifier(model, tokenizer, list(labels), list(templates), device=device)
    batch = torch.stack([preprocess(image) for image in images]).to(device)
    logits = model.temperature().float() * model.encode_image(batch).float() @ classifier
    if model.logit_bias is not None:
        return torch.sigmoid(logits + model.logit_bias.float()).cpu()
    return logits.softmax(dim=-1).cpu()


def parse_labels(text: str) -> list[str]:
    """Comma-separated labels, stripped; empty entries are an error rather than a silent class."""
    labels = [label.strip() for label in text.split(",")]
    if len(labels) < 2 or not all(labels):
        raise ValueError(f"--labels needs at least two non-empty, comma-separated labels, got {text!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"--labels has duplicates: {text!r}")
    return labels


def _open_image(path: str) -> Image.Image:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} not found")
    try:
        image = Image.open(path)
        image.load()  # Decode now, so a broken file fails here with its name.
        return image
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"{path!r} is not an image PIL can read") from None


def format_table(path: str, labels: Sequence[str], probabilities: torch.Tensor, top_k: int) -> str:
    """One image's labels, most probable first, with percentages: ``granny smith  85.61%``."""
    order = probabilities.argsort(descending=True, stable=True)[:top_k].tolist()
    width = max(len(labels[i]) for i in order)
    rows = [f"  {labels[i]:<{width}}  {100 * probabilities[i].item():6.2f}%" for i in order]
    return "\n".join([path, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clip_pl.predict",
        description="Rank candidate labels for each image with a trained clip_pl model (zero-shot).",
    )
    parser.add_argument("images", nargs="+", help="image files")
    add_model_arguments(parser)
    parser.add_argument("--labels", required=True, help='comma-separated candidate labels, e.g. "cat,dog,car"')
    parser.add_argument(
        "--templates",
        help=f"a file with one prompt template per line, or one template; default {DEFAULT_TEMPLATE!r}",
    )
    parser.add_argument("--top-k", type=int, default=None, help="show only the k most probable labels")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1...")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be at least 1, got {args.top_k}")
    try:
        labels = parse_labels(args.labels)
        templates = resolve_templates(args.templates if args.templates is not None else DEFAULT_TEMPLATE)
        images = [_open_image(path) for path in args.images]
        model, preprocess, tokenizer = load(args.checkpoint, device=args.device, openclip_model=args.openclip_model)
        probabilities = predict(model, preprocess, tokenizer, images, labels, templates)
    except USER_ERRORS as e:
        return report_user_error(e)
    top_k = min(args.top_k or len(labels), len(labels))
    if args.json:
        results = []
        for path, probs in zip(args.images, probabilities):
            order = probs.argsort(descending=True, stable=True)[:top_k].tolist()
            ranked = [{"label": labels[i], "probability": round(probs[i].item(), 6)} for i in order]
            results.append({"image": path, "predictions": ranked})
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(format_table(p, labels, probs, top_k) for p, probs in zip(args.images, probabilities)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
