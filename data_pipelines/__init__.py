"""Files in, tensors out: the bottom layer of the project, which imports nothing of ``clip_pl``.

Modules (imported explicitly, so that the command-line tools do not load Lightning):

* ``shards``: shard spec syntax, sources, weights and sizes.
* ``tar_reader``: the files of a tar shard, read without Python's ``tarfile``.
* ``samples``: what a sample is: the sample key syntax (``txt``, ``json:caption``), image decoding, raw samples.
* ``pipeline``: the training and validation streams of ``(images, tokens)`` batches (usable without Lightning).
* ``datamodule``: ``ShardDataModule``, the LightningDataModule used by ``train.py``.
* ``counters``: skip counters shared between DataLoader workers and the main process.
* ``ranks``: which process this is among how many.
* ``transforms``: image -> the tensor a tower expects (``PreprocessConfig``, ``image_transform``).
* ``tokenizer``, ``openclip_tokenizer``: caption -> token ids (SentencePiece; OpenAI's BPE).
* ``eval_data``: labelled evaluation images: folders, labelled shards, clip_benchmark's layout.
* ``atomic``: files written whole or not at all.
* ``errors``: one-line reports of mistakes a user can fix.
* ``make_shards``, ``inspect_shards``, ``train_tokenizer``: command-line tools (``python -m data_pipelines.X``).
* ``demo``: the generated coloured-shapes dataset of ``python train.py``.
"""
