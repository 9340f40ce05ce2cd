import pytest
import torch
from tiny_clip import make_model, make_tokenizer, write_checkpoint

from clip_pl import convert
from clip_pl.model import CLIP, create_model
from clip_pl.model_files import convert as mapping
from clip_pl.model_files.export import export_model
from clip_pl.model_files.pretrained import load_towers

# Both sides get a one-block text tower: only the image towers are compared, and the full text
# towers would double the time spent on random initialisation.
OUR_SMALL_TEXT = {"vocab_size": 64, "context_length": 8, "width": 64, "heads": 1, "layers": 1}
OPENCLIP_SMALL_TEXT = {"context_length": 8, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1}


@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def openclip_b32(open_clip):
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", pretrained=None, text_cfg=OPENCLIP_SMALL_TEXT).eval()


@pytest.fixture(scope="module")
def ours_b32():
    # Built on the meta device and given uninitialised memory: the random init of a ViT-B takes
    # seconds, and every image tower tensor is overwritten by the (strict) conversion anyway.
    with torch.device("meta"):
        model = create_model("vit_b32", text=OUR_SMALL_TEXT)
    return model.to_empty(device="cpu").eval()


def test_openclip_vit_b32_matches(openclip_b32, ours_b32):
    # A "module." prefix (DistributedDataParallel checkpoints) is accepted.
    mapping.load_openclip_image_tower(ours_b32, {f"module.{k}": v for k, v in openclip_b32.state_dict().items()})
    torch.manual_seed(1)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = openclip_b32.encode_image(images, normalize=True)
        got = ours_b32.encode_image(images)
    assert got.shape == expected.shape == (2, 512)
    assert (got - expected).abs().max().item() < 1e-5
    # The two random images get clearly different embeddings, so the match is not trivial.
    assert (got[0] - got[1]).abs().max().item() > 1e-2


def test_openclip_vit_b16_maps_every_trunk_tensor(open_clip):
    torch.manual_seed(0)
    visual = open_clip.create_model("ViT-B-16", pretrained=None, text_cfg=OPENCLIP_SMALL_TEXT).visual
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    with torch.device("meta"):
        tower = create_model("vit_b16", text=OUR_SMALL_TEXT).image_tower
    converted = mapping.convert_openclip_image_tower(state, tower)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in tower.state_dict().items()}
    assert converted["trunk.patch_embed.proj.weight"].shape == (768, 3, 16, 16)
    assert torch.equal(converted["trunk.patch_embed.proj.weight"], visual.conv1.weight)
    assert torch.equal(converted["trunk.pos_embed"][0], visual.positional_embedding)
    assert torch.equal(converted["trunk.cls_token"].flatten(), visual.class_embedding)
    qkv = converted["trunk.blocks.11.attn.qkv.weight"]
    assert torch.equal(qkv, visual.transformer.resblocks[11].attn.in_proj_weight)
    assert torch.equal(converted["trunk.norm.bias"], visual.ln_post.bias)
    assert torch.equal(converted["proj.weight"], visual.proj.T)


def test_convert_cli_writes_trunk_weights_for_training(open_clip, tmp_path, capsys, monkeypatch):
    # Two-block ViT-B/32s on both sides keep the files small; the mapping does not depend on depth.
    vision = {"image_size": 224, "layers": 2, "width": 768, "patch_size": 32}
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32", pretrained=None, vision_cfg=vision, text_cfg=OPENCLIP_SMALL_TEXT)
    real_config = convert.get_model_config

    def two_blocks(name, **overrides):
        image = {**overrides.pop("image", {}), "model_kwargs": {"depth": 2}}
        return real_config(name, image=image, **overrides)

    monkeypatch.setattr(convert, "get_model_config", two_blocks)
    source = tmp_path / "open_clip_pytorch_model.bin"
    # OpenCLIP training checkpoints wrap the weights in {"state_dict": ...}.
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, source)
    output = tmp_path / "trunk.safetensors"
    assert convert.main([str(source), str(output), "--model", "vit_b32"]) == 0
    assert "model.image.weights=" in capsys.readouterr().out
    # The file is what model.image.weights reads: a timm trunk, without the projection.
    config = two_blocks("vit_b32", image={"weights": str(output)}, text=OUR_SMALL_TEXT)
    tower = CLIP(config).image_tower.eval()
    reference.visual.proj = None  # open_clip's tower without projection returns the trunk's pooled features
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (tower.trunk(images) - reference.visual(images)).abs().max().item() < 1e-5


def test_other_vit_size_is_refused(openclip_b32):
    with pytest.raises(ValueError, match="width 768, 12 blocks, patch 32, but the image tower .* width 128, 4 blocks"):
        mapping.load_openclip_image_tower(create_model("tiny"), openclip_b32.state_dict())


def test_embed_dim_mismatch_is_refused(openclip_b32, ours_b32):
    state = dict(openclip_b32.state_dict())
    state["visual.proj"] = torch.zeros(768, 256)
    with pytest.raises(ValueError, match="build the model with embed_dim=256"):
        mapping.load_openclip_image_tower(ours_b32, state)


def test_non_vit_weights_are_refused():
    resnet_like = {"visual.layer1.0.conv1.weight": torch.zeros(1), "text_projection": torch.zeros(1)}
    tower = create_model("tiny").image_tower
    with pytest.raises(ValueError, match="ResNet"):
        mapping.convert_openclip_image_tower(resnet_like, tower)


def test_text_tower_of_another_size_is_refused_with_the_config_to_change(openclip_b32, ours_b32):
    state = {**openclip_b32.state_dict(), "token_embedding.weight": torch.zeros(32, 64)}  # another vocabulary
    with pytest.raises(ValueError, match=r"text_tower .* does not fit this model \(\d+ tensors differ, first text_tower\.\S+: \[.*\] there, \[.*\] here\); build the model with that model's text config"):
        mapping.load_openclip_model(ours_b32, state)


def test_a_state_dict_without_text_tower_is_refused():
    with pytest.raises(ValueError, match="no OpenAI/OpenCLIP text transformer"):
        mapping.convert_openclip_text_tower({"visual.class_embedding": torch.zeros(4)})


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("towers")
    tokenizer = make_tokenizer(directory)
    source, target = make_model(tokenizer, seed=3), make_model(tokenizer, seed=4)
    write_checkpoint(source, tokenizer, directory / "source.ckpt")
    export_model(source, tokenizer, directory / "source.safetensors")
    return source, target, tokenizer, directory


@pytest.mark.parametrize("filename", ["source.ckpt", "source.safetensors"])
def test_load_one_tower_from_our_model_file(two_models, filename):
    source, _, tokenizer, directory = two_models
    target = make_model(tokenizer, seed=4)
    text_before = {k: v.clone() for k, v in target.text_tower.state_dict().items()}
    load_towers(target, directory / filename, towers=["image_tower"])
    for key, value in source.image_tower.state_dict().items():
        assert torch.equal(target.image_tower.state_dict()[key], value)
    for key, value in target.text_tower.state_dict().items():
        assert torch.equal(value, text_before[key])
    assert not torch.equal(target.text_tower.proj.weight, source.text_tower.proj.weight)


def test_load_towers_errors(two_models):
    _, _, tokenizer, directory = two_models
    wider = create_model("tiny", embed_dim=32, text={"vocab_size": tokenizer.vocab_size, "context_length": 32})
    with pytest.raises(ValueError, match="the text_tower of .* does not fit this model"):
        load_towers(wider, directory / "source.ckpt", towers=["text_tower"])
    with pytest.raises(ValueError, match="towers must be"):
        load_towers(wider, directory / "source.ckpt", towers=["vision"])
