"""Data for clip_pl: WebDataset shards in, ``(images, tokens)`` batches out.

Modules (imported explicitly, so that the command-line tools do not load Lightning):

* ``datamodule``: ``ShardDataModule``, the LightningDataModule used by ``train.py``.
* ``pipeline``: the training and validation streams behind it (usable without Lightning).
* ``shards``: shard spec syntax, sources, weights and sizes.
* ``samples``: caption keys, image decoding, reading raw samples.
* ``tar_reader``: the files of a tar shard, read without Python's ``tarfile``.
* ``counters``: skip counters shared between DataLoader workers and the main process.
* ``make_shards``, ``inspect``, ``train_tokenizer``: command-line tools (``python -m data_pipelines.X``).
* ``demo``: the generated coloured-shapes dataset of ``python train.py``.
"""
