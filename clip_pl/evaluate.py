"""Evaluate a trained model: zero-shot classification and image-text retrieval.

Usage::

    python -m clip_pl.evaluate --checkpoint last.ckpt --suite datacomp --suite-root /data/eval

    python -m clip_pl.evaluate --checkpoint model.safetensors --zero-shot-folder imagenet/val \\
        --classnames imagenet_classes.txt --templates prompts.txt
    python -m clip_pl.evaluate --checkpoint last.ckpt --zero-shot-shards "val-{000..009}.tar" \\
        --classnames classes.txt --label-key json:label
    python -m clip_pl.evaluate --checkpoint last.ckpt --retrieval-shards "coco-val-{000..004}.tar" --json
    python -m clip_pl.evaluate --checkpoint ViT-B-32.pt --zero-shot-folder imagenet/val   # OpenAI's file

A suite (``clip_pl.evaluation.suite``) runs a list of datasets in clip_benchmark's WebDataset layout, prints a
table and writes every number, and the suite's average, to a JSON file. Otherwise zero-shot data
is a folder with one sub-folder per class, or shards with a class index per sample; retrieval data
is image-caption shards, one caption per image, read by the same code as training's validation.
Accuracies and recalls are printed as percentages (fractions with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import DataLoader

from clip_pl.evaluation.suite import PRECISIONS, Suite, SuiteResult, shipped_suites
from clip_pl.evaluation.zero_shot import ZeroShotTask, resolve_templates, run_retrieval
from clip_pl.model import CLIP
from clip_pl.model_files.load import add_model_arguments, load
from data_pipelines.atomic import atomic_output
from data_pipelines.errors import USER_ERRORS, report_user_error
from data_pipelines.pipeline import ValStream, make_decoder, select_val_shards
from data_pipelines.samples import SampleKey, check_layout
from data_pipelines.tokenizer import Tokenizer


def evaluate_retrieval(
    model: CLIP,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Tokenizer,
    spec: str,
    caption_key: str = "txt",
    batch_size: int = 64,
    num_workers: int = 0,
    chunk_size: int = 256,
) -> dict[str, float]:
    """Recall@1/5/10 in both directions over image-caption shards (one caption per image)."""
    urls = select_val_shards(spec)
    check_layout(urls, SampleKey.parse(caption_key))
    stream = ValStream(urls, tokenizer, batch_size, make_decoder(caption_key, preprocess), rank=0, world_size=1)
    # The stream batches itself; the DataLoader only adds worker processes.
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    return run_retrieval(model, loader, chunk_size=chunk_size)


def format_results(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table, one metric per line, values in percent."""
    rows = [
        (task, metric, f"{100 * value:.2f}") for task, metrics in results.items() for metric, value in metrics.items()
    ]
    header = ("task", "metric", "value %")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [f"{header[0]:<{widths[0]}}  {header[1]:<{widths[1]}}  {header[2]:>{widths[2]}}"]
    lines.append("-" * len(lines[0]))
    lines += [f"{t:<{widths[0]}}  {m:<{widths[1]}}  {v:>{widths[2]}}" for t, m, v in rows]
    return "\n".join(lines)


def run_suite(args: argparse.Namespace) -> int:
    """The ``--suite`` command: every dataset, a table on stdout, the JSON file; 1 when a dataset failed."""
    suite = Suite.from_file(
        args.suite,
        root=args.suite_root,
        dataset_root=args.dataset_root,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        precision=args.precision,
    )
    output = args.output or f"{suite.name}_results.json"
    model, _, tokenizer = load(args.checkpoint, device=args.device, openclip_model=args.openclip_model)

    def save(name: str, result: SuiteResult) -> None:
        # Written after every dataset, so that a long suite that stops keeps what it measured.
        with atomic_output(output) as tmp, open(tmp, "w") as f:
            json.dump({"checkpoint": args.checkpoint, **result.to_json()}, f, indent=2)
        if name in result.skipped or name in result.failed:
            print(f"{name}: {result.skipped.get(name) or result.failed[name]}", file=sys.stderr)

    result = suite.run(model, tokenizer, device=args.device, progress=sys.stderr.isatty(), on_dataset=save)
    print(result.table())
    print(f"results: {output}")
    return 1 if result.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clip_pl.evaluate", description="Zero-shot classification and retrieval metrics of a model."
    )
    add_model_arguments(parser)
    suite = parser.add_argument_group("suite of clip_benchmark datasets")
    suite.add_argument("--suite", help=f"suite file, or a shipped suite: {', '.join(shipped_suites())}")
    suite.add_argument("--suite-root", help="folder that holds the suite's dataset folders")
    suite.add_argument(
        "--dataset-root",
        help="pattern of each dataset's folder, replacing the suite's; {dataset} and {dataset_cleaned} "
        "as in clip_benchmark's --dataset_root",
    )
    suite.add_argument("--output", help="JSON results file (default: SUITE_results.json)")
    suite.add_argument(
        "--precision", choices=PRECISIONS, help="autocast of the forward passes (default: bf16 on a GPU, else fp32)"
    )
    zero_shot = parser.add_argument_group("zero-shot classification")
    data = zero_shot.add_mutually_exclusive_group()
    data.add_argument("--zero-shot-folder", help="folder with one sub-folder of images per class")
    data.add_argument("--zero-shot-shards", help="WebDataset shards with an image and a class index per sample")
    zero_shot.add_argument("--classnames", help="file with one class name per line, in label order")
    zero_shot.add_argument("--templates", help="file with one prompt template per line ({} is the class name)")
    zero_shot.add_argument("--label-key", default="cls", help="shards: 'cls' or 'json:FIELD' (default cls)")
    zero_shot.add_argument("--name", help="task name in the results (default: the folder or shard name)")
    retrieval = parser.add_argument_group("retrieval")
    retrieval.add_argument("--retrieval-shards", help="WebDataset image-caption shards, one caption per image")
    retrieval.add_argument("--caption-key", default="txt", help="'txt' or 'json:FIELD' (default txt)")
    retrieval.add_argument("--chunk-size", type=int, default=256, help="queries scored at once")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print the results as JSON (fractions, not percent)")
    args = parser.parse_args(argv)
    if args.zero_shot_folder and not os.path.isdir(args.zero_shot_folder):
        parser.error(f"--zero-shot-folder {args.zero_shot_folder!r} is not a folder (for shards: --zero-shot-shards)")
    zero_shot_data = args.zero_shot_folder or args.zero_shot_shards
    if args.suite:
        if zero_shot_data or args.retrieval_shards:
            parser.error("--suite runs alone; evaluate --zero-shot-*/--retrieval-shards in another command")
        try:
            return run_suite(args)
        except USER_ERRORS as e:
            return report_user_error(e)
    if not zero_shot_data and not args.retrieval_shards:
        parser.error(
            "nothing to evaluate: give --suite, --zero-shot-folder, --zero-shot-shards and/or --retrieval-shards"
        )

    results: dict[str, dict[str, float]] = {}
    try:
        model, preprocess, tokenizer = load(args.checkpoint, device=args.device, openclip_model=args.openclip_model)
        if zero_shot_data:
            name = args.name or os.path.basename(os.path.normpath(zero_shot_data)).split("{")[0] or "zero_shot"
            task = ZeroShotTask(
                name=name,
                data=zero_shot_data,
                classnames=args.classnames,
                templates=resolve_templates(args.templates),
                label_key=args.label_key,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
            )
            results[f"zero_shot/{name}"] = task.evaluate(model, tokenizer, device=args.device)
        if args.retrieval_shards:
            results["retrieval"] = evaluate_retrieval(
                model,
                preprocess,
                tokenizer,
                args.retrieval_shards,
                args.caption_key,
                args.batch_size,
                args.num_workers,
                args.chunk_size,
            )
    except USER_ERRORS as e:
        return report_user_error(e)
    print(json.dumps(results, indent=2) if args.json else format_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
