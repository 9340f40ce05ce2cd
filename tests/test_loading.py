import base64
import json
import os
import random
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_clip import make_model, make_tokenizer, random_image, write_checkpoint

import clip_pl
from clip_pl import export
from data_pipelines.transforms import (
    PreprocessConfig,
    RandomResizedCrop,
    image_transform,
    interpolation_mode,
    stack_pixels,
    to_rgb,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("api")
    tokenizer = make_tokenizer(directory)
    model = make_model(tokenizer, seed=1)
    checkpoint = write_checkpoint(model, tokenizer, directory / "last.ckpt")
    exported = directory / "model.safetensors"
    assert export.main([str(checkpoint), str(exported)]) == 0
    return model, tokenizer, checkpoint, exported


def test_load_checkpoint_and_export_give_identical_embeddings(files):
    original, _, checkpoint, exported = files
    images = torch.stack([image_transform(original.preprocess_config)(random_image(i)) for i in range(3)])
    captions = ["a red apple", "a dog running on the beach", "an unseen wörd"]
    results = []
    for path in (checkpoint, exported):
        model, preprocess, tokenizer = clip_pl.load(path)
        assert not model.training
        assert next(model.parameters()).device == torch.device("cpu")
        with torch.no_grad():
            batch = torch.stack([preprocess(random_image(i)) for i in range(3)])
            results.append((batch, model.encode_image(batch), model.encode_text(tokenizer(captions))))
    (batch_a, image_a, text_a), (batch_b, image_b, text_b) = results
    assert torch.equal(batch_a, images) and torch.equal(batch_b, images)
    assert torch.equal(image_a, image_b) and torch.equal(text_a, text_b)
    with torch.no_grad():
        assert torch.equal(image_a, original.encode_image(images))


def test_export_is_self_contained_safetensors(files):
    model, tokenizer, _, exported = files
    with safe_open(str(exported), framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
    assert keys == set(model.state_dict())
    assert metadata["format"] == "clip_pl" and metadata["tokenizer_context_length"] == "32"
    assert base64.b64decode(metadata["tokenizer_model"]) == tokenizer.model_proto
    assert json.loads(metadata["model_config"])["embed_dim"] == 64


def test_export_follows_the_umask_like_checkpoints(files, tmp_path):
    """safetensors writes its files 0600; exports get what any new file gets under the umask."""
    _, _, checkpoint, _ = files
    old_umask = os.umask(0o027)
    try:
        assert export.main([str(checkpoint), str(tmp_path / "model.safetensors")]) == 0
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(tmp_path / "model.safetensors").st_mode) == 0o640


def test_format_is_detected_from_content_not_name(files, tmp_path):
    _, _, checkpoint, exported = files
    renamed_ckpt, renamed_export = tmp_path / "weights.pt", tmp_path / "model.ckpt"
    renamed_ckpt.write_bytes(checkpoint.read_bytes())
    renamed_export.write_bytes(exported.read_bytes())
    tokens = clip_pl.load(exported)[2](["a cat"])
    a, b = clip_pl.load(renamed_ckpt)[0], clip_pl.load(renamed_export)[0]
    with torch.no_grad():
        assert torch.equal(a.encode_text(tokens), b.encode_text(tokens))


def _rewrite(source, target, metadata_changes=(), drop_tensor=None):
    with safe_open(str(source), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop_tensor}
    for key, value in dict(metadata_changes).items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    save_file(tensors, str(target), metadata=metadata)
    return target


@pytest.mark.parametrize(
    "changes, drop, message",
    [
        ({"format": None}, None, "metadata 'format' is None, expected 'clip_pl'"),
        ({"format_version": "99"}, None, "format_version '99' is not supported"),
        ({"model_config": "{not json"}, None, "model_config is not JSON"),
        ({"model_config": json.dumps({"embed_dim": 8, "colour": 1})}, None, "does not describe a CLIPConfig"),
        ({"tokenizer_model": "%%%"}, None, "tokenizer_model is not base64"),
        ({"tokenizer_model": base64.b64encode(b"junk").decode()}, None, "tokenizer cannot be rebuilt"),
        ({"tokenizer_context_length": "many"}, None, "tokenizer_context_length 'many' is not an integer"),
        ({"tokenizer_lowercase": "yes"}, None, "tokenizer_lowercase must be 'true' or 'false'"),
        ({"tokenizer_lowercase": None}, None, "metadata lacks tokenizer_lowercase"),
        ({}, "image_tower.proj.weight", "1 missing, e.g. ['image_tower.proj.weight']"),
    ],
)
def test_bad_export_metadata_gives_clear_error(files, tmp_path, changes, drop, message):
    bad = _rewrite(files[3], tmp_path / "bad.safetensors", changes, drop)
    with pytest.raises(ValueError) as error:
        clip_pl.load(bad)
    assert "is not a valid clip_pl export" in str(error.value)
    assert message in str(error.value)
    assert "python -m clip_pl.export" in str(error.value)


def test_wrong_shapes_and_non_safetensors(files, tmp_path):
    config = json.loads(_metadata(files[3])["model_config"])
    config["embed_dim"] = 32
    bad = _rewrite(files[3], tmp_path / "shape.safetensors", {"model_config": json.dumps(config)})
    with pytest.raises(ValueError, match="weights do not fit its model_config"):
        clip_pl.load(bad)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(files[3].read_bytes()[:5000])
    with pytest.raises(ValueError, match="safetensors cannot read it"):
        clip_pl.load(truncated)
    with pytest.raises(FileNotFoundError, match="not found"):
        clip_pl.load(tmp_path / "missing.ckpt")


def _metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_export_cli_reports_missing_checkpoint(tmp_path, capsys):
    assert export.main([str(tmp_path / "none.ckpt"), str(tmp_path / "out.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
    # As the README runs it: no runpy warning about clip_pl.export being imported with the package.
    result = subprocess.run([sys.executable, "-m", "clip_pl.export", "--help"], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0 and "checkpoint output" in result.stdout
    assert "found in sys.modules" not in result.stderr


# ---------------------------------------------------------------- transforms

CONFIG = PreprocessConfig(image_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bicubic")


def test_eval_transform_resizes_short_side_and_center_crops():
    image = random_image(0, size=(64, 40))  # 64 wide, 40 high
    out = image_transform(CONFIG)(image)
    assert out.shape == (3, 32, 32)
    resized = image.resize((51, 32), Image.Resampling.BICUBIC)  # short side 40 -> 32, width 64 * 0.8 = 51.2
    left = round((51 - 32) / 2)
    expected = np.asarray(resized.crop((left, 0, left + 32, 32)), dtype=np.float32)
    # The resize runs on uint8 tensors; it matches PIL's within 2 levels of 255.
    pixels = (out.permute(1, 2, 0).numpy() * np.array(CONFIG.std) + np.array(CONFIG.mean)) * 255
    assert np.abs(pixels - expected).max() <= 2
    assert np.abs(pixels - expected).mean() < 0.1


def test_train_transform_crops_randomly():
    torch.manual_seed(0)
    transform = image_transform(CONFIG, train=True, crop_scale=(0.3, 0.6))
    image = random_image(1, size=(64, 64))
    a, b = transform(image), transform(image)
    assert a.shape == b.shape == (3, 32, 32)
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="crop_scale"):
        image_transform(CONFIG, train=True, crop_scale=(0.5, 1.5))


@pytest.mark.parametrize(
    "height,width,scale",
    [(300, 400, (0.9, 1.0)), (400, 300, (0.08, 1.0)), (256, 256, (0.5, 0.6)), (100, 1000, (0.9, 1.0))],
)
def test_random_resized_crop_draws_torchvisions_crops(height, width, scale):
    torch.manual_seed(0)
    random.seed(0)
    mine = RandomResizedCrop(224, scale, interpolation_mode("bicubic"))
    theirs = v2.RandomResizedCrop(224, scale=scale)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    n = 3000
    ours = np.array([mine.params(height, width) for _ in range(n)], dtype=float)
    ref = np.array([list(theirs.make_params([image]).values())[:4] for _ in range(n)], dtype=float)
    # (top, left, height, width): the same distribution, compared by mean and spread of each.
    for a, b in zip(ours.T, ref.T):
        tolerance = 4 * b.std() / np.sqrt(n) + 0.5
        assert abs(a.mean() - b.mean()) < tolerance and abs(a.std() - b.std()) < tolerance
    area = ours[:, 2] * ours[:, 3] / (height * width)
    if width / height > 4 / 3 / scale[0]:
        # No crop of that area fits the ratio range: always the largest center crop of ratio 4/3.
        assert (ours == ref).all() and (ours[0] == [0, 433, 100, 133]).all()
    else:
        assert area.min() >= scale[0] - 0.02 and area.max() <= scale[1] + 0.02

    # Decoders give HWC pixels; torchvision's own tensors are CHW. The same pixels either way.
    chw = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    for pixels in (chw, chw.permute(1, 2, 0).contiguous().permute(2, 0, 1)):
        random.seed(5)
        top, left, h, w = mine.params(height, width)
        random.seed(5)
        expected = F.resized_crop(chw, top, left, h, w, [224, 224], v2.InterpolationMode.BICUBIC, antialias=True)
        out = mine(pixels)
        assert torch.equal(out, expected)
        # HWC in memory, so that a batch stacks without a transpose (``stack_pixels``).
        assert out.permute(1, 2, 0).is_contiguous()


def test_stack_pixels_equals_torch_stack_in_either_layout():
    chw = [torch.randint(0, 256, (3, 5, 5), dtype=torch.uint8) for _ in range(4)]
    hwc = [x.permute(1, 2, 0).contiguous().permute(2, 0, 1) for x in chw]
    for images in (chw, hwc, [chw[0], hwc[1], chw[2], hwc[3]]):
        assert torch.equal(stack_pixels(images), torch.stack(chw))
    assert stack_pixels(hwc).is_contiguous(memory_format=torch.channels_last)
    assert stack_pixels(chw).is_contiguous()


def test_horizontal_flip_mirrors_half_the_crops():
    random.seed(0)
    flip = RandomResizedCrop(8, (1.0, 1.0), interpolation_mode("bilinear"), horizontal_flip=True)
    pixels = torch.arange(3 * 8 * 8, dtype=torch.uint8).view(3, 8, 8)
    outs = [flip(pixels) for _ in range(400)]
    mirrored = sum(torch.equal(o, pixels.flip(-1)) for o in outs)
    assert all(torch.equal(o, pixels) or torch.equal(o, pixels.flip(-1)) for o in outs)
    assert 160 < mirrored < 240


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB" and rgb.getpixel((1, 1)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)
