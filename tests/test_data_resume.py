"""Resuming the training stream from the datamodule's state without replaying consumed data."""

from __future__ import annotations

from itertools import islice

import lightning.pytorch as pl
import pytest
import torch

from data_pipelines.datamodule import ShardDataModule


def datamodule(spec, tokenizer, **kw) -> ShardDataModule:
    defaults = dict(batch_size=4, num_workers=2, image_size=8, shuffle_buffer=3, mode="epoch")
    return ShardDataModule(spec, tokenizer, **{**defaults, **kw})


def test_epoch_mode_resumes_at_the_exact_sample(make_tiny_shards, tiny_tokenizer, read_ids):
    spec, ids = make_tiny_shards([7, 13, 4, 9, 7])
    loader = datamodule(spec, tiny_tokenizer).train_dataloader()
    full = [[read_ids(t) for _, t in loader] for _ in range(2)]

    interrupted = datamodule(spec, tiny_tokenizer)
    consumed = [read_ids(t) for _, t in islice(iter(interrupted.train_dataloader()), 3)]
    state = interrupted.state_dict()
    assert (state["epoch"], state["batches_done"]) == (0, 3)

    resumed = datamodule(spec, tiny_tokenizer)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    rest = [read_ids(t) for _, t in loader]
    # 3 + 7 batches: the uninterrupted epoch, each sample once, then the next epoch as usual.
    assert rest == full[0][3:]
    assert sorted(i for b in consumed + rest for i in b) == ids
    assert [read_ids(t) for _, t in loader] == full[1]
    assert resumed.state_dict()["epoch"] == 2


def test_resampled_mode_resumes_with_the_remaining_batches_of_a_new_stream(make_tiny_shards, tiny_tokenizer, read_ids):
    spec, _ = make_tiny_shards([10, 30, 20])
    kw = dict(mode="resampled", samples_per_epoch=40)
    full = [read_ids(t) for _, t in datamodule(spec, tiny_tokenizer, **kw).train_dataloader()]
    resumed = datamodule(spec, tiny_tokenizer, **kw)
    resumed.load_state_dict({**resumed.state_dict(), "batches_done": 4})
    rest = [read_ids(t) for _, t in resumed.train_dataloader()]
    assert len(full) == 10 and len(rest) == 6
    # Not the start of the stream again (what a restarted WebDataset pipeline would replay).
    assert rest != full[:6] and rest != full[4:]


def test_position_is_counted_outside_lightning_and_can_be_set(make_tiny_shards, tiny_tokenizer, read_ids):
    spec, _ = make_tiny_shards([8, 8])
    dm = datamodule(spec, tiny_tokenizer, num_workers=0)
    assert dm.batches_per_epoch == 4 and dm.state_dict()["batches_done"] == 0
    loader = dm.train_dataloader()
    list(loader)
    assert (dm.state_dict()["epoch"], dm.state_dict()["batches_done"]) == (1, 0)
    dm.set_position(5, 3)
    assert len(list(loader)) == 1
    assert (dm.state_dict()["epoch"], dm.state_dict()["batches_done"]) == (6, 0)


def test_changed_layout_warns_that_the_resume_is_approximate(make_tiny_shards, tiny_tokenizer):
    spec, _ = make_tiny_shards([8, 8])
    state = datamodule(spec, tiny_tokenizer, num_workers=2).state_dict()
    with pytest.warns(UserWarning, match="num_workers 2 -> 1") as record:
        datamodule(spec, tiny_tokenizer, num_workers=1).load_state_dict({**state, "batches_done": 2})
    assert any("resumes after 2 batches" in str(w.message) for w in record)


class _Recorder(pl.LightningModule):
    """Records the sample ids of every training and validation batch."""

    def __init__(self, read_ids):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.read_ids = read_ids
        self.train_ids: list[list[int]] = []
        self.val_ids: list[int] = []

    def training_step(self, batch, batch_idx):
        self.train_ids.append(self.read_ids(batch[1]))
        return (self.weight * batch[0].float().mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.val_ids.extend(self.read_ids(batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_resume_from_mid_epoch_checkpoints_continues_the_stream(
    tmp_path, make_tiny_shards, tiny_tokenizer, read_ids
):
    spec, ids = make_tiny_shards([7, 13, 4, 9, 7])
    val_spec, val_ids = make_tiny_shards([3, 4], name="val", start=100)
    trainer_kw = dict(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    full = _Recorder(read_ids)
    every_3 = pl.callbacks.ModelCheckpoint(tmp_path / "ckpt", "{step}", every_n_train_steps=3, save_top_k=-1)
    pl.Trainer(callbacks=[every_3], **trainer_kw).fit(
        full, datamodule=datamodule(spec, tiny_tokenizer, val_shards=val_spec)
    )
    assert len(full.train_ids) == 20
    assert sorted(i for b in full.train_ids[:10] for i in b) == ids
    assert sorted(full.val_ids) == sorted(val_ids + val_ids)  # each validation: every sample once

    # step=6: mid epoch 0; step=12: epoch 1 after 2 batches. No val_shards: val_dataloader() is [].
    for step in (6, 12):
        resumed = _Recorder(read_ids)
        pl.Trainer(**trainer_kw).fit(
            resumed, datamodule=datamodule(spec, tiny_tokenizer), ckpt_path=tmp_path / "ckpt" / f"step={step}.ckpt"
        )
        assert resumed.train_ids == full.train_ids[step:]
