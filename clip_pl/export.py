"""``python -m clip_pl.export``: a training checkpoint as one self-contained ``.safetensors`` file.

    python -m clip_pl.export checkpoints/last.ckpt model.safetensors

``--format open_clip`` writes a folder for open_clip instead (``clip_pl.model_files.export_openclip``)::

    python -m clip_pl.export --format open_clip checkpoints/last.ckpt model_dir

The file format is ``clip_pl.model_files.export``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from clip_pl.model_files.export import FORMAT, export_model
from clip_pl.model_files.export_openclip import TOKENIZER_FILE, WEIGHTS_FILE, export_openclip_file
from clip_pl.model_files.load import read_model_file
from clip_pl.model_files.openclip_models import CONFIG_FILE
from data_pipelines.errors import USER_ERRORS, report_user_error


def _export_openclip(source: str, directory: str) -> None:
    # Recorded rather than shown, so that each becomes one plain line after the summary.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        export_openclip_file(source, directory)
    files = [f for f in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE) if os.path.isfile(os.path.join(directory, f))]
    size_mb = os.path.getsize(os.path.join(directory, WEIGHTS_FILE)) / 2**20
    print(
        f"wrote {directory}: {', '.join(files)} ({size_mb:.1f} MiB of weights); load it with "
        f"open_clip.create_model_and_transforms('local-dir:{directory}')"
    )
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clip_pl.export",
        description="Export a training checkpoint to one self-contained .safetensors file for inference, "
        "or (--format open_clip) to a folder that open_clip loads.",
    )
    parser.add_argument(
        "checkpoint",
        help="training checkpoint (.ckpt) written by train.py; with --format open_clip also a clip_pl .safetensors",
    )
    parser.add_argument("output", help="file to write, e.g. model.safetensors; with --format open_clip, a folder")
    parser.add_argument(
        "--format",
        choices=(FORMAT, "open_clip"),
        default=FORMAT,
        help="clip_pl: one .safetensors file for clip_pl.load (default); open_clip: open_clip_config.json and "
        "open_clip_model.safetensors for open_clip.create_model_and_transforms('local-dir:OUTPUT')",
    )
    args = parser.parse_args(argv)
    try:
        if args.format == "open_clip":
            _export_openclip(args.checkpoint, args.output)
            return 0
        file = read_model_file(args.checkpoint)
        export_model(file.build(), file.tokenizer, args.output)
    except USER_ERRORS as e:
        return report_user_error(e)
    size_mb = os.path.getsize(args.output) / 2**20
    print(f"wrote {args.output} ({size_mb:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
