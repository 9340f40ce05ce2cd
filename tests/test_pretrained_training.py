"""train.py from a pretrained OpenCLIP/OpenAI model: with OpenAI's BPE, and with a new language's tokenizer.

The pretrained model is a ViT-B/32-shaped OpenCLIP model at 32 px (patch 8, 2 blocks per tower) with
random weights, written as a Hugging Face hub folder; the data is the demo's (nothing is downloaded).
"""

import copy
import shutil

import pytest
import torch
from test_openclip_models import assert_same_embeddings, hub_folder, small
from test_train import compose_train, demo_overrides  # noqa: F401  (demo_overrides is a fixture)

import clip_pl
import train
from clip_pl.model_files.checkpoint import CHECKPOINT_KEY, read_checkpoint
from clip_pl.model_files.load import read_model_file
from clip_pl.model_files.openclip_models import create_model_from_openclip
from data_pipelines.tokenizer import Tokenizer

IMAGE_SIZE = 32
TOKEN_EMBEDDING = "text_tower.token_embedding.weight"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The hub folder and open_clip's model it holds."""
    folder = tmp_path_factory.mktemp("openclip") / "ViT-B-32-small"
    return folder, hub_folder(folder, small("ViT-B-32", image_size=IMAGE_SIZE, patch_size=8))


class BuiltModule:
    """Wraps ``train.build`` to keep the module it builds and a copy of its model as built (before training)."""

    def __init__(self, monkeypatch):
        self.module = self.initial = None
        self.build = train.build
        monkeypatch.setattr(train, "build", self)

    def __call__(self, *args, **kwargs):
        module, datamodule, trainer = self.build(*args, **kwargs)
        self.module, self.initial = module, copy.deepcopy(module.model).eval()
        return module, datamodule, trainer


def _changed(before, after, keys):
    return [k for k in keys if not torch.equal(before[k], after[k])]


def test_training_from_an_openclip_folder_with_openais_bpe(pretrained, demo_overrides, tmp_path,  # noqa: F811
                                                          monkeypatch):
    source, reference = pretrained
    folder = shutil.copytree(source, tmp_path / "model")  # the test removes its weights below
    run_dir = tmp_path / "run"
    args = [*demo_overrides, "model=openclip", f"model.source={folder}", "tokenizer=openclip_bpe", f"run_dir={run_dir}",
            "optim.warmup_steps=1", "+trainer.limit_val_batches=0"]

    # model=openclip leaves the image size to the pretrained model, but the demo draws its images first.
    without_size = [a for a in args if not a.startswith("model.image.image_size=")]
    message = r"model=openclip leaves null: set model.image.image_size=32 \(the pretrained model's size\)$"
    with pytest.raises(ValueError, match=message):
        train.train(compose_train([*without_size, "trainer.max_steps=3"]))

    built = BuiltModule(monkeypatch)
    train.train(compose_train([*args, "trainer.max_steps=3"]))
    assert built.module.tokenizer.kind == "openclip_bpe"
    # As built: open_clip's embeddings and temperature, with the BPE's ids.
    assert_same_embeddings(built.initial, built.module.tokenizer, reference, IMAGE_SIZE)

    checkpoint_path = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(checkpoint_path)
    assert checkpoint["global_step"] == 3
    assert checkpoint[CHECKPOINT_KEY]["tokenizer"]["kind"] == "openclip_bpe"
    before, after = built.initial.state_dict(), read_model_file(checkpoint_path).state_dict
    trained = ["logit_scale", "image_tower.trunk.blocks.0.attn.qkv.weight", "text_tower.blocks.1.mlp.0.weight",
               TOKEN_EMBEDDING]
    assert _changed(before, after, trained) == trained

    # The checkpoint reloads with its tokenizer, and embeds as the trained module does.
    model, _, tokenizer = clip_pl.load(checkpoint_path)
    assert tokenizer.kind == "openclip_bpe" and model.config.text.vocab_size == 49408
    trained_model = built.module.model.eval()
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    tokens = tokenizer(["a red circle at the top left", "a blue star"])
    assert torch.equal(tokens, built.module.tokenizer(["a red circle at the top left", "a blue star"]))
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), trained_model.encode_image(images))
        assert torch.equal(model.encode_text(tokens), trained_model.encode_text(tokens))

    # A rerun resumes from last.ckpt without reading the pretrained weights (init is skipped); the
    # architecture is still read from the folder's config.
    (folder / "open_clip_model.safetensors").unlink()
    train.train(compose_train([*args, "trainer.max_steps=5"]))
    assert read_checkpoint(checkpoint_path)["global_step"] == 5


def test_new_language_recipe_from_an_openclip_folder(pretrained, demo_overrides, tmp_path, monkeypatch):  # noqa: F811
    folder, _ = pretrained
    cache = next(a for a in demo_overrides if a.startswith("demo_cache=")).partition("=")[2]
    # The recipe, on the demo's shards and its SentencePiece tokenizer, on CPU, the image tower locked whole.
    args = [*demo_overrides, "experiment=finetune_new_language", "data=demo", "trainer=cpu", "model=openclip",
            f"model.source={folder}", f"tokenizer.path={cache}/tokenizer.model", "module.lock_image_unlocked_groups=0",
            "optim.lr=1e-3", "optim.warmup_steps=1", "trainer.max_steps=3", "+trainer.limit_val_batches=0",
            f"run_dir={tmp_path}"]
    built = BuiltModule(monkeypatch)
    train.train(compose_train(args))

    expected = create_model_from_openclip(folder, load_weights=True).state_dict()
    initial = built.initial.state_dict()
    tokenizer = Tokenizer.from_file(f"{cache}/tokenizer.model")
    assert built.module.tokenizer.kind == "sentencepiece" and tokenizer.vocab_size == 128
    # After init: everything is the OpenCLIP model's but the token embedding, which is new, one row
    # per SentencePiece piece, at the text tower's initialisation; the tower pools at that tokenizer's EOS.
    assert initial.keys() == expected.keys()
    assert _changed(initial, expected, [k for k in expected if k != TOKEN_EMBEDDING]) == []
    assert initial[TOKEN_EMBEDDING].shape == (128, 64) and expected[TOKEN_EMBEDDING].shape == (49408, 64)
    assert initial[TOKEN_EMBEDDING].std().item() == pytest.approx(0.02, rel=0.2)
    assert built.initial.config.text.eos_id == tokenizer.eos_id == 3

    # Three steps with the image tower locked: its trunk is unchanged, its projection and the text tower trained.
    after = read_model_file(tmp_path / "checkpoints" / "last.ckpt").state_dict
    image_trunk = [k for k in initial if k.startswith("image_tower.trunk.")]
    assert len(image_trunk) > 20 and _changed(initial, after, image_trunk) == []
    text = [k for k in initial if k.startswith("text_tower.")]
    assert _changed(initial, after, ["image_tower.proj.weight", *text]) == ["image_tower.proj.weight", *text]
