"""OpenAI/OpenCLIP ViT CLIPs in clip_pl: every family's structure, every kind of source, clear errors.

No downloads: the open_clip models are built from open_clip's bundled configs with random weights,
at reduced depth and width (2 blocks, 2 heads of the family's own head width) where full size is too
big for CI, keeping each family's patch size, image size, head width, MLP ratio and activation.
"""

import copy
import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from clip_pl.model import CLIP, get_model_config
from clip_pl.model_files.openclip_models import (
    clip_config_from_openclip,
    create_model_from_openclip,
    load_openclip,
    openclip_model_config,
)

FAMILIES = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-g-14", "ViT-bigG-14", "ViT-B-32-quickgelu"]
CAPTIONS = ["a photo of a cat", "two dogs playing in the snow", "an astronaut riding a horse"]


def small(name: str, **vision) -> dict:
    """The family's config at 2 blocks and 2 heads per tower, its head width, MLP ratio and image size kept."""
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    head_width = cfg["vision_cfg"].get("head_width", 64)
    cfg["vision_cfg"].update(layers=2, width=2 * head_width, **vision)
    cfg["text_cfg"].update(layers=2, width=64, heads=2)
    cfg["embed_dim"] = 48
    return cfg


def hub_folder(directory, cfg, seed=0, weights_file="open_clip_model.safetensors"):
    """An open_clip model with random weights, written as a Hugging Face hub repository holds it."""
    torch.manual_seed(seed)
    reference = open_clip.CLIP(**cfg).eval()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if weights_file.endswith(".safetensors"):
        save_file(state, directory / weights_file)
    else:
        torch.save(state, directory / weights_file)
    return reference


def assert_same_embeddings(model, tokenizer, reference, image_size):
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    tokens = tokenizer(CAPTIONS)
    assert torch.equal(tokens, open_clip.get_tokenizer("ViT-B-32", context_length=tokens.shape[1])(CAPTIONS))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images, normalize=True),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens, normalize=True),
                                   rtol=0, atol=1e-5)
    assert model.logit_scale.item() == reference.logit_scale.item()


@pytest.mark.parametrize("family", FAMILIES)
def test_each_vit_family_gives_open_clips_embeddings(family, tmp_path):
    cfg = small(family)
    reference = hub_folder(tmp_path / family, cfg)
    model, tokenizer = load_openclip(tmp_path / family)
    assert ("quickgelu" in model.config.image.name) == model.config.text.quick_gelu == family.endswith("quickgelu")
    assert_same_embeddings(model, tokenizer, reference, cfg["vision_cfg"]["image_size"])


@pytest.mark.parametrize(
    "preset, family",
    [("vit_b32", "ViT-B-32"), ("vit_b16", "ViT-B-16"), ("vit_l14", "ViT-L-14"), ("vit_l14_336", "ViT-L-14-336"),
     ("vit_h14", "ViT-H-14"), ("vit_g14", "ViT-g-14"), ("vit_bigg14", "ViT-bigG-14")],
)
def test_presets_have_open_clips_shapes(preset, family):
    # Full size on the meta device: every tensor of the preset has the shape of OpenCLIP's model.
    with torch.device("meta"):
        ours = CLIP(get_model_config(preset)).state_dict()
        theirs = CLIP(clip_config_from_openclip(open_clip.get_model_config(family))).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    heads = {"vit_h14": 16, "vit_g14": 16, "vit_bigg14": 16}.get(preset, None)
    if heads:  # 80-, 88- and 104-wide heads: the same count as OpenCLIP's, which shapes alone cannot show
        width = open_clip.get_model_config(family)["vision_cfg"]
        assert width["width"] // width["head_width"] == heads


def test_a_bare_weights_file_with_a_name_or_a_config_json(tmp_path):
    cfg = small("ViT-B-16", image_size=64)
    reference = hub_folder(tmp_path / "hub", cfg, weights_file="open_clip_pytorch_model.bin")
    (tmp_path / "model.json").write_text(json.dumps(cfg))
    model, tokenizer = load_openclip(tmp_path / "hub" / "open_clip_pytorch_model.bin", str(tmp_path / "model.json"))
    assert_same_embeddings(model, tokenizer, reference, 64)
    # A name is looked up among open_clip's bundled configs (here the full-size config, which the file does not fit).
    assert openclip_model_config(tmp_path / "hub" / "open_clip_pytorch_model.bin", "ViT-B-16")["vision_cfg"]["width"] == 768
    with pytest.raises(ValueError, match="the weights are a ViT of width 128, 2 blocks, patch 16, but the image tower "
                                         "'vit_base_patch16_clip_224' has width 768, 12 blocks, patch 16"):
        load_openclip(tmp_path / "hub" / "open_clip_pytorch_model.bin", "ViT-B-16")
    with pytest.raises(ValueError, match="is a bare weights file; say which model it holds"):
        load_openclip(tmp_path / "hub" / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError, match="unknown OpenCLIP model name 'ViT-B-61'; did you mean"):
        load_openclip(tmp_path / "hub" / "open_clip_pytorch_model.bin", "ViT-B-61")


def test_openais_torchscript_file_needs_no_config(tmp_path):
    # OpenAI's released files are TorchScript archives of QuickGELU ViTs with 64-wide heads.
    cfg = small("ViT-B-32-quickgelu", image_size=64)
    cfg["text_cfg"].update(width=128, heads=2)  # OpenAI's text heads are 64 wide too
    torch.manual_seed(0)
    reference = open_clip.CLIP(**cfg).eval()
    traced = torch.jit.trace_module(reference, {"encode_image": torch.randn(1, 3, 64, 64)}, check_trace=False)
    torch.jit.save(traced, tmp_path / "ViT.pt")
    model, tokenizer = load_openclip(tmp_path / "ViT.pt")
    assert model.config.text.quick_gelu and "quickgelu" in model.config.image.name
    assert_same_embeddings(model, tokenizer, reference, 64)


def test_another_image_size_resamples_the_position_embedding(tmp_path):
    cfg = small("ViT-B-32", image_size=64)
    hub_folder(tmp_path / "hub", cfg)
    model = create_model_from_openclip(tmp_path / "hub", image={"image_size": 96}, load_weights=True).eval()
    assert model.image_tower.trunk.pos_embed.shape[1] == 1 + (96 // 32) ** 2
    with torch.no_grad():
        assert torch.isfinite(model.encode_image(torch.randn(1, 3, 96, 96))).all()


@pytest.mark.parametrize(
    "name, message",
    [("RN50", "is a ResNet"), ("ViT-B-16-SigLIP", "vision_cfg.timm_model_name='vit_base_patch16_siglip_224' names a tower"),
     ("convnext_base", "vision_cfg.timm_model_name='convnext_base' names a tower")],
)
def test_unsupported_families_are_named(name, message):
    cfg = open_clip.get_model_config(name)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        clip_config_from_openclip(cfg)


def test_not_an_openclip_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not an OpenCLIP model folder"):
        load_openclip(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_openclip(tmp_path / "missing")
