"""``python -m clip_pl.export --format open_clip``: a folder open_clip loads, with the model's exact embeddings.

No downloads: the open_clip models are built from open_clip's bundled configs with random weights, at
2 blocks and 2 heads per tower (see ``small`` in test_openclip_models.py).
"""

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from test_openclip_models import CAPTIONS, small
from tiny_clip import CONTEXT_LENGTH, make_model, make_tokenizer, write_checkpoint

from clip_pl.export import main
from clip_pl.model import create_model
from clip_pl.model_files.openclip_models import create_model_from_openclip, load_openclip
from data_pipelines.openclip_tokenizer import OpenCLIPTokenizer
from data_pipelines.tokenizer import Tokenizer

IMAGE_SIZE = 64


def openclip_folder(directory, cfg):
    """A random open_clip model written as a hub folder, its logit scale and bias moved off their initial values."""
    torch.manual_seed(0)
    reference = open_clip.CLIP(**cfg).eval()
    with torch.no_grad():
        reference.logit_scale.fill_(3.25)
        if reference.logit_bias is not None:
            reference.logit_bias.fill_(-7.5)
    directory.mkdir()
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, directory / "open_clip_model.safetensors")
    return reference


def load_export(folder):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval(), preprocess


def images():
    return torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "family, logit_bias", [("ViT-B-32-quickgelu", False), ("ViT-B-16", False), ("ViT-B-16", True)]
)
def test_an_openclip_model_round_trips(family, logit_bias, tmp_path, capsys):
    cfg = small(family, image_size=IMAGE_SIZE)
    if logit_bias:
        cfg["init_logit_bias"] = -10.0
    reference = openclip_folder(tmp_path / "source", cfg)
    model, tokenizer = load_openclip(tmp_path / "source")
    write_checkpoint(model, tokenizer, tmp_path / "last.ckpt")

    assert main(["--format", "open_clip", str(tmp_path / "last.ckpt"), str(tmp_path / "export")]) == 0
    assert "warning" not in capsys.readouterr().err  # open_clip's own tokenizer is the model's
    exported, preprocess = load_export(tmp_path / "export")
    theirs, ours = reference.state_dict(), exported.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    tokens = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'export'}")(CAPTIONS)
    assert torch.equal(tokens, tokenizer(CAPTIONS))
    with torch.no_grad():
        for encode in ("encode_image", "encode_text"):
            inputs = images() if encode == "encode_image" else tokens
            torch.testing.assert_close(getattr(exported, encode)(inputs), getattr(reference, encode)(inputs),
                                       rtol=0, atol=1e-5)
    assert exported.logit_scale.item() == 3.25
    assert (exported.logit_bias is not None) == logit_bias
    if logit_bias:
        assert exported.logit_bias.item() == -7.5
    assert preprocess.transforms[0].size == IMAGE_SIZE


def test_a_shorter_bpe_context_than_the_towers_is_a_warning(tmp_path, capsys):
    openclip_folder(tmp_path / "source", small("ViT-B-32", image_size=IMAGE_SIZE))
    model, _ = load_openclip(tmp_path / "source")
    write_checkpoint(model, OpenCLIPTokenizer.from_file(context_length=16), tmp_path / "last.ckpt")
    assert main(["--format", "open_clip", str(tmp_path / "last.ckpt"), str(tmp_path / "export")]) == 0
    assert capsys.readouterr().err == (
        "warning: clip_pl's tokenizer cuts captions at 16 tokens and open_clip's at 77: captions longer than 16 "
        "tokens get other embeddings in open_clip\n"
    )


def test_a_sentencepiece_model_exports_with_its_tokenizer_and_a_warning(tmp_path, capsys):
    tokenizer = make_tokenizer(tmp_path)
    model = make_model(tokenizer)
    write_checkpoint(model, tokenizer, tmp_path / "last.ckpt")
    # Through clip_pl's own export: --format open_clip also reads an exported .safetensors.
    assert main([str(tmp_path / "last.ckpt"), str(tmp_path / "model.safetensors")]) == 0
    capsys.readouterr()
    folder = tmp_path / "export"
    assert main(["--format", "open_clip", str(tmp_path / "model.safetensors"), str(folder)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: open_clip's tokenizer will NOT give this model's token ids")
    assert f"Tokenizer.from_file('{folder / 'tokenizer.model'}', context_length={CONTEXT_LENGTH})" in err

    exported, preprocess = load_export(folder)
    ids = Tokenizer.from_file(folder / "tokenizer.model", context_length=CONTEXT_LENGTH)(CAPTIONS)
    assert torch.equal(ids, tokenizer(CAPTIONS))
    # The end token (3) is not the highest id, so only pooling at it gives clip_pl's text features.
    assert (ids.argmax(dim=1) != (ids == tokenizer.eos_id).int().argmax(dim=1)).all()
    with torch.no_grad():
        torch.testing.assert_close(exported.encode_image(images(), normalize=True), model.encode_image(images()),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(exported.encode_text(ids, normalize=True), model.encode_text(ids), rtol=0, atol=1e-5)
    assert exported.logit_scale.item() == model.logit_scale.item()
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"] == {"size": 64, "mean": list(model.preprocess_config.mean),
                                        "std": list(model.preprocess_config.std), "interpolation": "bicubic",
                                        "resize_mode": "shortest"}
    assert config["clip_pl"]["tokenizer"] == {"kind": "sentencepiece", "context_length": CONTEXT_LENGTH,
                                              "file": "tokenizer.model", "lowercase": False}
    assert preprocess.transforms[0].size == 64
    # And back into clip_pl: the tower pools at the same end token.
    back = create_model_from_openclip(folder, load_weights=True).eval()
    assert back.config.text.eos_id == tokenizer.eos_id
    with torch.no_grad():
        torch.testing.assert_close(back.encode_text(ids), model.encode_text(ids), rtol=0, atol=1e-5)


def test_an_earlier_export_is_replaced_and_other_folders_are_refused(tmp_path, capsys):
    tokenizer = make_tokenizer(tmp_path)
    write_checkpoint(make_model(tokenizer, seed=0), tokenizer, tmp_path / "a.ckpt")
    write_checkpoint(make_model(tokenizer, seed=1), tokenizer, tmp_path / "b.ckpt")
    folder = tmp_path / "export"
    assert main(["--format", "open_clip", str(tmp_path / "a.ckpt"), str(folder)]) == 0
    (folder / "README.md").write_text("notes")  # a user's own file keeps the folder an export
    assert main(["--format", "open_clip", str(tmp_path / "b.ckpt"), str(folder)]) == 0
    exported, _ = load_export(folder)
    assert torch.equal(exported.logit_scale, make_model(tokenizer, seed=1).logit_scale)
    assert torch.equal(exported.visual.proj, make_model(tokenizer, seed=1).image_tower.proj.weight.T)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "open_clip_config.json", "open_clip_model.safetensors", "tokenizer.model"]

    # An export killed mid-write: no config yet, a weights file and a temporary of a dead writer.
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "open_clip_model.safetensors").write_text("partial")
    (killed / ".open_clip_model.safetensors.9999999.0123abcd.tmp").write_text("partial")
    assert main(["--format", "open_clip", str(tmp_path / "a.ckpt"), str(killed)]) == 0
    assert sorted(p.name for p in killed.iterdir()) == [
        "open_clip_config.json", "open_clip_model.safetensors", "tokenizer.model"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("keep")
    capsys.readouterr()
    assert main(["--format", "open_clip", str(tmp_path / "a.ckpt"), str(other)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {str(other)!r} is not empty and not an open_clip export of clip_pl; give a new or empty " \
                  "folder so that no other model's files end up next to the export\n"
    assert [p.name for p in other.iterdir()] == ["data.txt"]


def test_models_open_clip_cannot_build_and_missing_files_are_one_line_errors(tmp_path, capsys):
    tokenizer = make_tokenizer(tmp_path)
    torch.manual_seed(0)
    resnet = create_model("tiny", image={"name": "resnet10t"}, text={"vocab_size": tokenizer.vocab_size})
    write_checkpoint(resnet, tokenizer, tmp_path / "resnet.ckpt")
    capsys.readouterr()
    assert main(["--format", "open_clip", str(tmp_path / "resnet.ckpt"), str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert err == ("error: open_clip builds only CLIP ViT image towers (timm's vit_*_clip_*), not 'resnet10t'; "
                   "export this model in clip_pl's format\n")
    assert not (tmp_path / "export").exists()

    # A CLIP ViT trunk with options open_clip's ViT lacks here: layer scale, no qkv bias.
    kwargs = {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2, "init_values": 1e-5, "qkv_bias": False}
    vit = create_model("tiny", image={"model_kwargs": kwargs}, text={"vocab_size": tokenizer.vocab_size})
    write_checkpoint(vit, tokenizer, tmp_path / "vit.ckpt")
    assert main(["--format", "open_clip", str(tmp_path / "vit.ckpt"), str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: OpenCLIP's ViT cannot hold the image tower 'vit_base_patch16_clip_224' (no place "
                          "for ['visual.transformer.resblocks.0.ls1.gamma', ")
    assert "nothing for ['visual.transformer.resblocks.0.attn.in_proj_bias', " in err and err.count("\n") == 1
    assert not (tmp_path / "export").exists()

    assert main(["--format", "open_clip", str(tmp_path / "missing.ckpt"), str(tmp_path / "export")]) == 2
    assert capsys.readouterr().err == f"error: model file {str(tmp_path / 'missing.ckpt')!r} not found\n"
