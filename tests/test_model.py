import math

import pytest
import timm
import torch

from clip_pl.model import (
    MAX_LOGIT_SCALE,
    MODEL_CONFIGS,
    CLIPConfig,
    PatchProjection,
    create_model,
    get_model_config,
)

EOS, PAD = 3, 0


def _tokens(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, vocab, (batch, length), generator=g)
    for row in range(batch):
        end = 3 + row % (length - 4)
        tokens[row, end] = EOS
        tokens[row, end + 1 :] = PAD
    return tokens


# (embed_dim, text width) follow OpenAI CLIP; small images keep the forward pass cheap on CPU.
EXPECTED = {"rn50": (1024, 512), "vit_b32": (512, 512), "vit_b16": (512, 512), "vit_l14": (768, 768), "tiny": (64, 128)}


# The larger presets are checked shape for shape against OpenCLIP's configs (tests/test_openclip_models.py).
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_config_forward(name):
    image_size = {"rn50": 64, "vit_b32": 64, "vit_b16": 32, "vit_l14": 28, "tiny": 64}[name]
    model = create_model(name, image={"image_size": image_size}).eval()
    config = model.config
    assert (config.embed_dim, config.text.width) == EXPECTED[name]
    if name != "tiny":
        assert (config.text.layers, config.text.context_length) == (12, 77)
    with torch.no_grad():
        out = model(torch.randn(2, 3, image_size, image_size), _tokens(2, config.text.context_length, 500))
    assert out.image_features.shape == out.text_features.shape == (2, config.embed_dim)
    assert torch.allclose(out.image_features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out.text_features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out.logit_bias is None


def test_all_named_configs_listed():
    assert {"tiny", "rn50", "vit_b32", "vit_b16", "vit_l14"} <= set(MODEL_CONFIGS)


@pytest.mark.parametrize("trunk", ["resnet18", "convnext_atto", "vit_small_patch16_224"])
def test_any_timm_family(trunk):
    model = create_model("tiny", image={"name": trunk, "image_size": 32}).eval()
    with torch.no_grad():
        feats = model.encode_image(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 64)


def test_unknown_timm_model_suggests_close_names():
    with pytest.raises(ValueError, match="resnet50"):
        create_model("tiny", image={"name": "resnet5O"})


def test_unknown_model_name_lists_choices():
    with pytest.raises(ValueError, match="vit_b16"):
        create_model("vit_b61")


def test_unknown_tower_option():
    with pytest.raises(ValueError, match="model.text.widht is not a text tower option"):
        get_model_config("tiny", text={"widht": 3})


def test_preprocess_config_follows_trunk():
    clip_vit = create_model("vit_b32", image={"image_size": 64}).preprocess_config
    assert clip_vit.image_size == 64
    assert clip_vit.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert clip_vit.interpolation == "bicubic"
    resnet = create_model("tiny", image={"name": "resnet18"}).preprocess_config
    assert resnet.mean == pytest.approx((0.485, 0.456, 0.406))


def test_text_pools_at_eos_not_at_max_id():
    """Tokens after EOS must not change the embedding (sentencepiece's EOS is not the largest id)."""
    model = create_model("tiny").eval()
    tokens = _tokens(3, 32, 1000)
    changed = tokens.clone()
    changed[changed == PAD] = 999  # the largest id, where argmax pooling would look
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), model.encode_text(changed), atol=1e-6)
        shorter = tokens.clone()
        shorter[0, 2] = EOS  # moving EOS must move the pooling position
        assert not torch.allclose(model.encode_text(tokens)[0], model.encode_text(shorter)[0], atol=1e-3)
    assert model.text_tower.eos_positions(tokens).tolist() == [3, 4, 5]


def test_unnormalized_outputs_and_temperature_cap():
    model = create_model("tiny").eval()
    with torch.no_grad():
        raw = model.encode_text(_tokens(2, 32, 1000), normalize=False)
        assert not torch.allclose(raw.norm(dim=-1), torch.ones(2))
        model.logit_scale.fill_(10.0)
    assert model.temperature().item() == pytest.approx(math.exp(MAX_LOGIT_SCALE))


def test_siglip_bias_parameter():
    model = create_model("tiny", init_logit_bias=-10.0, init_logit_scale=math.log(10))
    assert model.logit_bias.item() == -10.0 and model.temperature().item() == pytest.approx(10.0)
    assert "logit_bias" in dict(model.named_parameters())


def test_config_dict_round_trip():
    config = get_model_config("vit_b16", text={"vocab_size": 32000}, init_logit_bias=-10.0)
    assert CLIPConfig.from_dict(config.to_dict()) == config


def test_local_trunk_weights(tmp_path):
    source = create_model("tiny", image={"name": "resnet18", "image_size": 32})
    torch.save(source.image_tower.trunk.state_dict(), tmp_path / "trunk.pth")
    loaded = create_model("tiny", image={"name": "resnet18", "weights": str(tmp_path / "trunk.pth")})
    for key, value in source.image_tower.trunk.state_dict().items():
        assert torch.equal(value, loaded.image_tower.trunk.state_dict()[key])
    with pytest.raises(ValueError, match="do not fit"):
        create_model("tiny", image={"name": "resnet34", "weights": str(tmp_path / "trunk.pth")})


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = create_model("tiny")
    ckpt = create_model("tiny", image={"grad_checkpointing": True}, text={"grad_checkpointing": True})
    ckpt.load_state_dict(plain.state_dict())
    images, tokens = torch.randn(4, 3, 64, 64), _tokens(4, 32, 1000)
    for model in (plain, ckpt):
        out = model(images, tokens)
        (out.image_features.sum() + out.text_features.pow(2).sum()).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_replacing_the_trunk_drops_the_presets_kwargs():
    config = get_model_config("tiny", image={"name": "resnet18"})
    assert config.image.model_kwargs == {}
    assert get_model_config("tiny").image.model_kwargs["depth"] == 4
    assert get_model_config("tiny", image={"name": "vit_small_patch16_224", "model_kwargs": {"depth": 2}}).image.model_kwargs == {"depth": 2}


def test_patch_projection_equals_the_convolution_it_replaces():
    torch.manual_seed(0)
    fast = create_model("tiny")
    assert type(fast.image_tower.trunk.patch_embed.proj) is PatchProjection
    slow = create_model("tiny")
    slow.load_state_dict(fast.state_dict())
    conv = slow.image_tower.trunk.patch_embed.proj
    plain = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride)
    plain.weight, plain.bias = conv.weight, conv.bias
    slow.image_tower.trunk.patch_embed.proj = plain
    images = torch.randn(4, 3, 64, 64)
    for model in (fast, slow):
        model.encode_image(images).pow(3).sum().backward()
    assert torch.allclose(fast.encode_image(images), slow.encode_image(images), atol=1e-5)
    for (name, a), b in zip(fast.named_parameters(), slow.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    # Same names and shapes as timm's own trunk: checkpoints and pretrained trunk weights still load.
    image = fast.config.image
    reference = timm.create_model(
        image.name, pretrained=False, num_classes=0, img_size=image.image_size, **image.model_kwargs
    )
    reference_shapes = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in fast.image_tower.trunk.state_dict().items()} == reference_shapes


def test_patch_projection_falls_back_and_leaves_other_convolutions_alone():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 4, 4)
    patch = PatchProjection(3, 8, 4, 4)
    patch.load_state_dict(conv.state_dict())
    for size in (16, 18):  # 18 is not a multiple of the patch: the convolution runs
        x = torch.randn(2, 3, size, size)
        assert torch.allclose(patch(x), conv(x), atol=1e-5)
    resnet = create_model("tiny", image={"name": "resnet18", "image_size": 32})
    assert not any(isinstance(m, PatchProjection) for m in resnet.modules())
    overlapping = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    overlapping.patch_embed.proj = torch.nn.Conv2d(3, 192, 16, 16, padding=1)
    PatchProjection.replace(overlapping)
    assert type(overlapping.patch_embed.proj) is torch.nn.Conv2d


def test_tiny_preset_is_a_clip_style_vit():
    # CLIP's ViT: a LayerNorm before the blocks and no patch-embedding bias (OpenAI's layout).
    trunk = create_model("tiny").image_tower.trunk
    assert isinstance(trunk.norm_pre, torch.nn.LayerNorm)
    assert trunk.patch_embed.proj.bias is None
    assert (len(trunk.blocks), trunk.embed_dim, trunk.patch_embed.patch_size) == (4, 128, (8, 8))


def test_a_plain_vit_tower_is_warned_about():
    with pytest.warns(UserWarning, match="without CLIP's pre-LayerNorm") as caught:
        model = create_model("tiny", image={"name": "vit_tiny_patch16_224", "model_kwargs": {"patch_size": 8, "depth": 1}})
    assert len([w for w in caught if "pre-LayerNorm" in str(w.message)]) == 1
    assert "vit_base_patch16_clip_224" in str(caught[0].message)
    # The tower is built as asked, timm's plain ViT with timm's init: no pre-LayerNorm.
    assert isinstance(model.image_tower.trunk.norm_pre, torch.nn.Identity)
