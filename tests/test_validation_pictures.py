"""Validation pictures: the callback's choice of pairs, its loggers, and a real run writing PNGs and TensorBoard images."""

from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.precision import Precision
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import compose_train, demo_overrides  # noqa: F401  (demo_overrides is a fixture)

import train
from clip_pl.model import create_model
from clip_pl.training.validation_pictures import ValidationPictures
from data_pipelines.tokenizer import Tokenizer


def _batch(tokenizer, ids):
    images = torch.stack([torch.full((3, 32, 32), i / 10.0) for i in ids])
    return images, tokenizer([f"photo {i}" for i in ids])


def test_first_pairs_of_first_validation_are_kept_and_logged(tiny_tokenizer, read_ids, tmp_path):
    tokenizer = Tokenizer(tiny_tokenizer.model_proto, context_length=32)
    torch.manual_seed(0)
    model = create_model("tiny", image={"image_size": 32}, text={"vocab_size": tokenizer.vocab_size}).eval()
    module = SimpleNamespace(model=model, tokenizer=tokenizer, device=torch.device("cpu"))
    wandb = mock.create_autospec(WandbLogger, instance=True)
    trainer = SimpleNamespace(is_global_zero=True, sanity_checking=True, global_step=0, loggers=[wandb],
                              default_root_dir=str(tmp_path), precision_plugin=Precision())
    pictures = ValidationPictures(num_samples=8, top_k=2)

    def validate(*batches):
        for i, batch in enumerate(batches):
            pictures.on_validation_batch_end(trainer, module, None, _batch(tokenizer, batch), i)
        pictures.on_validation_epoch_end(trainer, module)

    validate(range(100, 105))  # Lightning's sanity check: ignored
    assert pictures.images is None and wandb.log_image.call_count == 0
    trainer.sanity_checking, trainer.global_step = False, 7
    validate(range(0, 5), range(5, 10))
    # The first 8 pairs, across batches; a later validation does not replace or extend them.
    trainer.global_step = 9
    validate(range(20, 25))
    assert read_ids(pictures.tokens) == list(range(8))
    assert torch.equal(pictures.images[:, 0, 0, 0], torch.arange(8) / 10.0)

    calls = [(c.kwargs["key"], c.kwargs["step"]) for c in wandb.log_image.call_args_list]
    assert calls == [("val/similarity_matrix", 7), ("val/retrieval", 7), ("val/similarity_matrix", 9), ("val/retrieval", 9)]
    for call, (name, step) in zip(wandb.log_image.call_args_list, [("similarity", 7), ("retrieval", 7)]):
        png = np.asarray(Image.open(tmp_path / "pictures" / f"step_{step}_{name}.png"))
        (logged,) = call.kwargs["images"]
        assert logged.dtype == np.uint8 and np.array_equal(logged, png)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="callbacks.pictures.num_samples"):
        ValidationPictures(num_samples=0)


def test_demo_run_draws_the_same_pairs_at_chosen_validations(demo_overrides, tmp_path):  # noqa: F811
    cfg = compose_train([*demo_overrides, f"run_dir={tmp_path}", "logger=tensorboard", "trainer.max_steps=6",
                         "optim.warmup_steps=1", "+trainer.val_check_interval=2", "+trainer.limit_val_batches=1",
                         "zero_shot=[]", "callbacks.pictures.every_n_validations=2"])
    train.train(cfg)
    # Validations at steps 2, 4 and 6; drawn at the first and every second after it.
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == [
        "step_2_retrieval.png", "step_2_similarity.png", "step_6_retrieval.png", "step_6_similarity.png"]
    first, last = (np.asarray(Image.open(tmp_path / "pictures" / f"step_{s}_similarity.png")) for s in (2, 6))
    cell = 112
    header = first.shape[0] - 8 * cell
    assert first.shape == last.shape and first.shape[1] == 9 * cell and 0 < header < cell
    # Same images in the thumbnail column, other similarities in the cells after 4 training steps.
    assert np.array_equal(first[header:, :cell], last[header:, :cell])
    assert not np.array_equal(first[header:, cell:], last[header:, cell:])
    retrieval = Image.open(tmp_path / "pictures" / "step_2_retrieval.png")
    assert retrieval.width == 112 + 420 and retrieval.height >= 8 * 112

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"val/similarity_matrix", "val/retrieval"} <= set(events.Tags()["images"])
    logged = events.Images("val/similarity_matrix")
    assert [e.step for e in logged] == [2, 6]
    assert (logged[0].height, logged[0].width) == first.shape[:2]
