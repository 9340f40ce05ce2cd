"""How long the DataComp suite (``clip_pl/evaluation/suites/datacomp.yaml``) takes for one model, from measured rates.

The suite's cost is its images (about 613,000, each decoded, resized and embedded once) and its
prompts (class names x templates, and the retrieval captions, each embedded once). Both rates are
measured here through the suite's own code (``clip_pl.evaluation.suite.Suite.run``) on a generated set in
clip_benchmark's layout: JPEGs of 256-512 px for the images, and for the prompts a set of 1,000
classes under the templates file's prompts. The suite's time is then images / images-per-second
+ prompts / prompts-per-second, with the image and class counts of DataComp's task list and the
template counts of clip_benchmark's templates files. Random weights: the cost does not depend on them.

    python benchmarks/suite_time.py --model vit_b32                       # CPU
    python benchmarks/suite_time.py --model vit_b32 --device cuda --images 4096 --num-workers 8
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from clip_pl.evaluation.suite import Suite, SuiteDataset
from clip_pl.model import create_model
from data_pipelines.tokenizer import Tokenizer, train_sentencepiece

# DataComp's task list (tasklist.yml): test images and classes of the suite's 31 classification
# sets; the retrieval sets are clip_benchmark's test splits (images, captions).
CLASSIFICATION = {
    "imagenet1k": (50000, 1000), "imagenet_sketch": (50889, 1000), "imagenetv2": (10000, 1000),
    "imagenet-a": (7500, 200), "imagenet-o": (2000, 200), "imagenet-r": (30000, 200), "objectnet": (18574, 113),
    "caltech101": (6085, 102), "cifar100": (10000, 100), "clevr_count_all": (15000, 8),
    "clevr_closest_object_distance": (15000, 6), "dtd": (1880, 47), "eurosat": (5400, 10),
    "kitti_closest_vehicle_distance": (711, 4), "flowers": (6149, 102), "pets": (3669, 37), "pcam": (32768, 2),
    "resisc45": (6300, 45), "sun397": (108754, 397), "svhn": (26032, 10), "cifar10": (10000, 10),
    "country211": (21100, 211), "fgvc_aircraft": (3333, 100), "food101": (25250, 101), "gtsrb": (12630, 43),
    "mnist": (10000, 10), "voc2007": (14976, 20), "renderedsst2": (1821, 2), "cars": (8041, 196),
    "stl10": (8000, 10), "camelyon17": (85054, 2),
}
RETRIEVAL = {"flickr30k": (1000, 5000), "mscoco_captions": (5000, 25010)}
# Templates of the datasets that clip_benchmark's file does not list under their own name.
TEMPLATES_OF = {name: "imagenet1k" for name in ("imagenet_sketch", "imagenetv2", "imagenet-a", "imagenet-o",
                                                "imagenet-r", "objectnet", "camelyon17")}


def template_counts() -> dict[str, int]:
    """Prompts per class of each classification set, from clip_benchmark's English templates file."""
    import clip_benchmark.datasets

    path = os.path.join(os.path.dirname(clip_benchmark.datasets.__file__), "en_zeroshot_classification_templates.json")
    with open(path) as f:
        templates = json.load(f)
    return {name: len(templates[TEMPLATES_OF.get(name, name)]) for name in CLASSIFICATION}


def write_set(root: str, images: int, classes: list[str], templates: list[str], seed: int = 0) -> None:
    os.makedirs(os.path.join(root, "test"))
    rng = np.random.default_rng(seed)
    with wds.TarWriter(os.path.join(root, "test", "0.tar"), encoder=False) as sink:
        for i in range(images):
            w, h = (int(v) for v in rng.integers(256, 513, 2))
            pixels = (rng.integers(0, 256, 3) + rng.normal(0, 40, (h // 8, w // 8, 3))).clip(0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).resize((w, h), Image.BILINEAR).save(buffer, format="JPEG", quality=90)
            sink.write({"__key__": f"s{i:07d}", "jpg": buffer.getvalue(), "cls": str(i % len(classes)).encode()})
    with open(os.path.join(root, "test", "nshards.txt"), "w") as f:
        f.write("1\n")
    with open(os.path.join(root, "classnames.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
    with open(os.path.join(root, "zeroshot_classification_templates.txt"), "w") as f:
        f.write("\n".join(templates) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b32", help="a clip_pl model preset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="default: bf16 on a GPU, fp32 elsewhere")
    parser.add_argument("--images", type=int, default=512, help="images timed")
    parser.add_argument("--prompt-classes", type=int, default=200, help="classes timed (x 8 templates)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()

    words = [f"thing{i}" for i in range(1000)]
    with tempfile.TemporaryDirectory() as directory:
        proto = train_sentencepiece(words * 3, os.path.join(directory, "tok.model"), vocab_size=1000, num_threads=2).model_proto
        tokenizer = Tokenizer(proto, context_length=77)
        model = create_model(args.model, text={"vocab_size": tokenizer.vocab_size}).to(args.device).eval()
        templates = ["a photo of a {c}.", "a bad photo of the {c}.", "a sculpture of a {c}.", "a rendering of a {c}.",
                     "graffiti of a {c}.", "a tattoo of the {c}.", "itap of a {c}.", "a drawing of the {c}."]
        write_set(os.path.join(directory, "images"), args.images, ["a", "b"], templates[:1])
        write_set(os.path.join(directory, "prompts"), 1, words[: args.prompt_classes], templates)
        rates = {}
        for name, count in (("images", args.images), ("prompts", args.prompt_classes * len(templates))):
            suite = Suite("timing", [SuiteDataset(name, "zeroshot_classification", name)], root=directory,
                          batch_size=args.batch_size, num_workers=args.num_workers, precision=args.precision)
            suite.run(model, tokenizer, device=args.device)  # warm-up: first-call costs, file cache
            start = time.perf_counter()
            suite.run(model, tokenizer, device=args.device)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            rates[name] = count / (time.perf_counter() - start)
    images = sum(n for n, _ in CLASSIFICATION.values()) + sum(n for n, _ in RETRIEVAL.values())
    counts = template_counts()
    prompts = sum(c * counts[name] for name, (_, c) in CLASSIFICATION.items()) + sum(c for _, c in RETRIEVAL.values())
    seconds = images / rates["images"] + prompts / rates["prompts"]
    print(f"model {args.model} on {args.device} ({torch.get_num_threads()} threads), batch {args.batch_size}, "
          f"{args.num_workers} workers, precision {args.precision or 'default'}")
    print(f"images:  {rates['images']:8.1f} /s   (decode 256-512 px JPEG, resize, embed; {args.images} timed)")
    print(f"prompts: {rates['prompts']:8.1f} /s   ({args.prompt_classes * len(templates)} timed)")
    print(f"datacomp suite: {images} images, {prompts} prompts -> {seconds / 60:.1f} min "
          f"({images / rates['images'] / 60:.1f} min of images, {prompts / rates['prompts'] / 60:.1f} of prompts)")


if __name__ == "__main__":
    main()
