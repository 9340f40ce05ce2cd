"""Runs OpenCLIP's trainer (``open_clip_train.main``) on a model config from a JSON file.

    python benchmarks/openclip_launcher.py MODEL.json [open_clip_train.main arguments]

The JSON (``embed_dim``, ``vision_cfg``, ``text_cfg``) is registered under its file name, which
``--model`` then names. Used by ``benchmarks/quality.py``.

One compatibility shim: open_clip_train pins ``webdataset<=0.2.86``, clip_pl needs ``>=0.2.100``.
Since 1.0, webdataset's tar expander ends each shard with an empty dict, which open_clip_train's
sample grouping (``group_by_keys_nothrow``) fails on with ``KeyError: 'fname'``; the expander is
called here without that marker, as 0.2.86 behaved. Nothing else of the trainer is changed.
"""

from __future__ import annotations

import functools
import sys

import open_clip
import open_clip_train.data
from open_clip_train.main import main


def patch_tar_expander() -> None:
    """Makes open_clip_train's WebDataset pipeline read shards with webdataset 1.x (see above)."""
    open_clip_train.data.tar_file_expander = functools.partial(open_clip_train.data.tar_file_expander, eof_value=None)


if __name__ == "__main__":
    patch_tar_expander()
    open_clip.add_model_config(sys.argv[1])
    # main returns -1 for a refused start (an existing experiment name) instead of raising.
    sys.exit(main(sys.argv[2:]))
