"""init.*: a run starting from towers of an earlier run, with a new tokenizer, or from OpenCLIP image weights."""

import shutil

import pytest
import torch
from omegaconf import OmegaConf
from test_train import compose_train, demo_overrides  # noqa: F401  (demo_overrides is a fixture)

import train
from clip_pl.model import DEFAULT_LOGIT_SCALE
from clip_pl.model_files.export import export_model
from clip_pl.model_files.load import load_model, read_model_file
from clip_pl.model_files.pretrained import init_from_pretrained
from data_pipelines.tokenizer import Tokenizer, train_sentencepiece

RUSSIAN_CAPTIONS = [
    f"{colour} {shape} {place}"
    for colour in ("красный", "зелёный", "синий", "жёлтый", "фиолетовый", "чёрный")
    for shape in ("круг", "квадрат", "треугольник", "звезда")
    for place in ("вверху слева", "вверху справа", "внизу слева", "внизу справа", "в центре")
]


@pytest.fixture(scope="module")
def pretrained(demo_overrides, tmp_path_factory):  # noqa: F811
    """An earlier run's last.ckpt (4 steps, so no weight is at its initial value) and its export."""
    run_dir = tmp_path_factory.mktemp("pretrained")
    cfg = compose_train([*demo_overrides, f"run_dir={run_dir}", "trainer.max_steps=4", "optim.warmup_steps=1",
                         "+trainer.limit_val_batches=0"])
    train.train(cfg)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    file = read_model_file(checkpoint)
    export_model(file.build(), file.tokenizer, run_dir / "model.safetensors")
    return checkpoint


@pytest.fixture(scope="module")
def russian_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("ru") / "ru.model"
    train_sentencepiece(RUSSIAN_CAPTIONS * 4, path, vocab_size=90, model_type="bpe", byte_fallback=False,
                        character_coverage=1.0, num_threads=1)
    return path


def _model(overrides, run_dir):
    module, _, _ = train.build(compose_train(overrides), str(run_dir))
    return module.model


def _tower(state, tower):
    return {k[len(tower) + 1 :]: v for k, v in state.items() if k.startswith(f"{tower}.")}


def _assert_equal(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("filename", ["checkpoints/last.ckpt", "model.safetensors"])
def test_both_towers_and_logit_scale_load(pretrained, demo_overrides, tmp_path, filename):  # noqa: F811
    source = pretrained.parent.parent / filename
    expected = read_model_file(pretrained).state_dict
    assert expected["logit_scale"].item() != pytest.approx(DEFAULT_LOGIT_SCALE, abs=1e-6)
    model = _model([*demo_overrides, f"init.from_checkpoint={source}"], tmp_path)
    _assert_equal(model.state_dict(), expected)


def test_only_the_chosen_tower_loads(pretrained, demo_overrides, tmp_path):  # noqa: F811
    expected = read_model_file(pretrained).state_dict
    fresh = _model(demo_overrides, tmp_path / "fresh").state_dict()
    model = _model([*demo_overrides, f"init.from_checkpoint={pretrained}", "init.towers=[image_tower]"], tmp_path)
    state = model.state_dict()
    _assert_equal(_tower(state, "image_tower"), _tower(expected, "image_tower"))
    # The text tower and the temperature are the run's own initialisation, not the checkpoint's.
    _assert_equal(_tower(state, "text_tower"), _tower(fresh, "text_tower"))
    assert not torch.equal(state["text_tower.proj.weight"], expected["text_tower.proj.weight"])
    assert state["logit_scale"].item() == pytest.approx(DEFAULT_LOGIT_SCALE)


def test_new_tokenizer_gets_a_new_token_embedding(pretrained, russian_tokenizer, demo_overrides, tmp_path):  # noqa: F811
    expected = read_model_file(pretrained).state_dict
    overrides = [*demo_overrides, f"init.from_checkpoint={pretrained}", f"tokenizer.path={russian_tokenizer}"]
    with pytest.raises(ValueError, match="another tokenizer .* set init.new_token_embedding=true"):
        _model(overrides, tmp_path)
    state = _model([*overrides, "init.new_token_embedding=true"], tmp_path).state_dict()
    embedding = state.pop("text_tower.token_embedding.weight")
    old_embedding = expected.pop("text_tower.token_embedding.weight")
    # Everything else, the rest of the text tower included, is the checkpoint's.
    _assert_equal(state, expected)
    new_vocab = Tokenizer.from_file(russian_tokenizer).vocab_size
    assert new_vocab != old_embedding.shape[0]
    assert embedding.shape == (new_vocab, old_embedding.shape[1])
    # The text tower's initialisation (std 0.02), not rows copied from the old embedding.
    assert embedding.std().item() == pytest.approx(0.02, rel=0.1)


def test_other_tokenizer_is_refused_even_when_shapes_fit(pretrained, russian_tokenizer):
    # Equal shapes do not make the rows mean the same tokens.
    model, _ = load_model(pretrained)
    other = Tokenizer.from_file(russian_tokenizer)
    with pytest.raises(ValueError, match="init.new_token_embedding=true"):
        init_from_pretrained(model, other, from_checkpoint=str(pretrained))


def test_errors_and_resume(pretrained, demo_overrides, tmp_path):  # noqa: F811
    model, tokenizer = load_model(pretrained)
    with pytest.raises(ValueError, match="init.towers must be"):
        init_from_pretrained(model, tokenizer, from_checkpoint=str(pretrained), towers=["vision"])
    with pytest.raises(ValueError, match="both give the image tower"):
        init_from_pretrained(model, tokenizer, from_checkpoint=str(pretrained), image_tower="open_clip.bin")
    with pytest.raises(FileNotFoundError, match="init.from_checkpoint"):
        _model([*demo_overrides, "init.from_checkpoint=/nonexistent.ckpt"], tmp_path)
    # The fine-tuning experiment without the checkpoint it continues: not a silent start from scratch.
    init = OmegaConf.to_container(compose_train(["experiment=finetune_new_language"]).init)
    with pytest.raises(ValueError, match="new_token_embedding=true loads the text tower of init.from_checkpoint or "
                                         "init.openclip, neither of which is set"):
        init_from_pretrained(model, tokenizer, **init)
    # A run that resumes takes its weights from its own last.ckpt and does not read init files.
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(pretrained, tmp_path / "checkpoints" / "last.ckpt")
    _model([*demo_overrides, "init.from_checkpoint=/nonexistent.ckpt"], tmp_path)


def test_openclip_image_tower_loads_into_vit_b32(demo_overrides, tmp_path):  # noqa: F811
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    # A one-block text tower on both sides: only the image tower is loaded, and it is the real ViT-B/32.
    small_text = {"context_length": 16, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1}
    reference = open_clip.create_model("ViT-B-32", pretrained=None, text_cfg=small_text)
    torch.save(reference.state_dict(), tmp_path / "open_clip.pt")
    model = _model([*demo_overrides, "model=vit_b32", "model.image.image_size=224", "prepare_data.image_size=32",
                    "+model.text.width=64", "+model.text.heads=1", "+model.text.layers=1",
                    f"init.image_tower={tmp_path / 'open_clip.pt'}"], tmp_path)
    visual, trunk = reference.visual, model.image_tower.trunk
    assert torch.equal(trunk.patch_embed.proj.weight, visual.conv1.weight)
    assert torch.equal(trunk.pos_embed[0], visual.positional_embedding)
    assert torch.equal(trunk.cls_token.flatten(), visual.class_embedding)
    for i in (0, 11):
        assert torch.equal(trunk.blocks[i].attn.qkv.weight, visual.transformer.resblocks[i].attn.in_proj_weight)
        assert torch.equal(trunk.blocks[i].mlp.fc2.bias, visual.transformer.resblocks[i].mlp.c_proj.bias)
    assert torch.equal(trunk.norm_pre.weight, visual.ln_pre.weight)
    assert torch.equal(trunk.norm.bias, visual.ln_post.bias)
    assert torch.equal(model.image_tower.proj.weight, visual.proj.T)
