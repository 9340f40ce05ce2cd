"""OpenCLIP/OpenAI models through clip_pl.load, predict and evaluate: open_clip's embeddings and preprocessing.

Small random-weight models, written as open_clip and OpenAI write them (nothing is downloaded).
"""

import json

import open_clip
import pytest
import torch
from test_openclip_models import CAPTIONS, hub_folder, small
from tiny_clip import make_image_folder, make_model, make_tokenizer, random_image

import clip_pl
from clip_pl import evaluate, predict
from clip_pl.model_files.export import export_model

IMAGE_SIZE = 64
LABELS = ["cat", "dog", "car"]
SIZES = [(80, 60), (60, 80), (IMAGE_SIZE, IMAGE_SIZE), (300, 200), (33, 47)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """``{kind: (path, openclip_model, open_clip's model)}`` for a hub folder, a bare weights file + config
    .json, a bare weights file in torch.save's format + the same, and an OpenAI TorchScript file."""
    directory = tmp_path_factory.mktemp("pretrained")
    cfg = small("ViT-B-32", image_size=IMAGE_SIZE)
    folder = directory / "hub"
    reference = hub_folder(folder, cfg)
    (directory / "model.json").write_text(json.dumps(cfg))
    torch.save(reference.state_dict(), directory / "open_clip_pytorch_model.bin")
    # OpenAI's files: TorchScript archives of QuickGELU ViTs whose text heads are 64 wide.
    openai_cfg = small("ViT-B-32-quickgelu", image_size=IMAGE_SIZE)
    openai_cfg["text_cfg"].update(width=128, heads=2)
    torch.manual_seed(1)
    openai = open_clip.CLIP(**openai_cfg).eval()
    example = {"encode_image": torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)}
    traced = torch.jit.trace_module(openai, example, check_trace=False)
    torch.jit.save(traced, directory / "ViT-B-32.pt")
    config = str(directory / "model.json")
    return {
        "folder": (folder, None, reference),
        "safetensors+json": (folder / "open_clip_model.safetensors", config, reference),
        "bin+json": (directory / "open_clip_pytorch_model.bin", config, reference),
        "openai_torchscript": (directory / "ViT-B-32.pt", None, openai),
    }


def _images():
    return [random_image(i, size) for i, size in enumerate(SIZES)]


@pytest.mark.parametrize("kind", ["folder", "safetensors+json", "bin+json", "openai_torchscript"])
def test_load_gives_open_clips_embeddings(sources, kind):
    path, openclip_model, reference = sources[kind]
    model, preprocess, tokenizer = clip_pl.load(path, openclip_model=openclip_model)
    assert not model.training and tokenizer.kind == "openclip_bpe"
    tokens = tokenizer(CAPTIONS)
    assert torch.equal(tokens, open_clip.get_tokenizer("ViT-B-32")(CAPTIONS))
    batch = torch.stack([preprocess(image) for image in _images()])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(batch), reference.encode_image(batch, normalize=True),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens, normalize=True),
                                   rtol=0, atol=1e-5)
    assert model.temperature().item() == pytest.approx(reference.logit_scale.exp().item(), rel=1e-6)


def test_preprocess_is_open_clips(sources):
    """OpenAI's mean and std, the shorter side resized bicubic, the center crop: open_clip's eval transform.

    The one difference is the resize's implementation (torchvision on uint8 tensors here, PIL in
    open_clip): pixels differ by at most 1 level of 255, the embeddings by less than 0.01.
    """
    path, _, reference = sources["folder"]
    model, preprocess, _ = clip_pl.load(path)
    config = model.preprocess_config
    assert (config.image_size, config.interpolation) == (IMAGE_SIZE, "bicubic")
    assert config.mean == open_clip.OPENAI_DATASET_MEAN and config.std == open_clip.OPENAI_DATASET_STD
    theirs = open_clip.image_transform(IMAGE_SIZE, is_train=False)  # as create_model_and_transforms builds it
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    ours_batch, theirs_batch = [], []
    for image in _images():
        a, b = preprocess(image), theirs(image)
        assert a.shape == b.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        levels = ((a - b) * std * 255).abs()
        assert levels.max().item() <= 1.0 + 1e-4 and levels.mean().item() < 0.02
        ours_batch.append(a)
        theirs_batch.append(b)
    with torch.no_grad():
        ours_features = model.encode_image(torch.stack(ours_batch))
        theirs_features = reference.encode_image(torch.stack(theirs_batch), normalize=True)
    assert (ours_features - theirs_features).abs().max().item() < 0.01


def _expected_probabilities(reference, images, preprocess):
    """What predict should print: open_clip's model and tokenizer, the default prompt, a softmax."""
    prompts = open_clip.get_tokenizer("ViT-B-32")([f"a photo of a {label}." for label in LABELS])
    with torch.no_grad():
        text = reference.encode_text(prompts, normalize=True)
        image = reference.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        return (reference.logit_scale.exp() * image @ text.T).softmax(dim=-1)


@pytest.mark.parametrize("kind", ["folder", "bin+json", "openai_torchscript"])
def test_predict_cli_on_pretrained_models(sources, kind, tmp_path, capsys):
    path, openclip_model, reference = sources[kind]
    images = _images()[:2]
    files = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    args = ["--checkpoint", str(path), "--labels", ",".join(LABELS), "--json", *files]
    assert predict.main(args + (["--openclip-model", openclip_model] if openclip_model else [])) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = _expected_probabilities(reference, images, clip_pl.load(path, openclip_model=openclip_model)[1])
    for result, probabilities in zip(printed, expected):
        got = {p["label"]: p["probability"] for p in result["predictions"]}
        assert [got[label] for label in LABELS] == pytest.approx(probabilities.tolist(), abs=2e-6)
    # Far enough from 1/3 each that a wrong image or text embedding would show beyond the tolerance.
    assert (expected - 1 / 3).abs().min().item() > 1e-3, expected


def test_evaluate_cli_reads_the_same_model_from_a_folder_and_from_weights_and_json(sources, tmp_path, capsys):
    data = make_image_folder(tmp_path / "zeroshot", ["cat", "dog"], per_class=3)
    results = []
    for kind in ("folder", "safetensors+json"):
        path, openclip_model, _ = sources[kind]
        extra = ["--openclip-model", openclip_model] if openclip_model else []
        assert evaluate.main(["--checkpoint", str(path), *extra, "--zero-shot-folder", str(data), "--json",
                              "--device", "cpu"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1] and 0 <= results[0]["zero_shot/zeroshot"]["top1"] <= 1


def test_the_format_is_read_from_the_content(sources, tmp_path, capsys):
    # A clip_pl export and an OpenCLIP weights file are both .safetensors; the metadata tells them apart.
    tokenizer = make_tokenizer(tmp_path)
    export_model(make_model(tokenizer), tokenizer, tmp_path / "export.safetensors")
    assert clip_pl.load(tmp_path / "export.safetensors")[2].kind == "sentencepiece"
    with pytest.raises(ValueError, match="is a clip_pl model file, which holds its own model config: drop openclip_model"):
        clip_pl.load(tmp_path / "export.safetensors", openclip_model="ViT-B-32")
    random_image(0).save(tmp_path / "image.png")
    for kind in ("safetensors+json", "bin+json"):
        path = sources[kind][0]
        with pytest.raises(ValueError, match=r"name the model they hold: openclip_model=NAME or a config \.json"):
            clip_pl.load(path)
        # On the command line: one line that names the option.
        assert predict.main(["--checkpoint", str(path), "--labels", "a,b", str(tmp_path / "image.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and err.count("(--openclip-model on the command line)") == 2


def test_a_folder_exported_by_clip_pl_keeps_its_sentencepiece_tokenizer(tmp_path):
    from clip_pl.model_files.export_openclip import export_openclip

    tokenizer = make_tokenizer(tmp_path)
    model = make_model(tokenizer, seed=3)
    with pytest.warns(UserWarning, match="open_clip's tokenizer will NOT give this model's token ids"):
        export_openclip(model, tokenizer, tmp_path / "export")
    loaded, _, loaded_tokenizer = clip_pl.load(tmp_path / "export")
    assert loaded_tokenizer.kind == "sentencepiece"
    tokens = loaded_tokenizer(CAPTIONS)
    assert torch.equal(tokens, tokenizer(CAPTIONS))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(tokens), model.encode_text(tokens), rtol=0, atol=1e-6)
