import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_clip import CONTEXT_LENGTH, make_model, make_tokenizer, random_image

from clip_pl import predict
from clip_pl.model import create_model
from clip_pl.model_files.export import export_model
from data_pipelines.transforms import image_transform

LABELS = ["granny smith", "ipod", "pizza"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("predict")
    tokenizer = make_tokenizer(directory)
    model = make_model(tokenizer, seed=2)
    export_model(model, tokenizer, directory / "model.safetensors")
    images = []
    for i, size in enumerate([(80, 60), (50, 90)]):
        path = directory / f"img{i}.png"
        random_image(10 + i, size).save(path)
        images.append(str(path))
    with torch.no_grad():
        expected = predict.predict(
            model,
            image_transform(model.preprocess_config),
            tokenizer,
            [random_image(10 + i, size) for i, size in enumerate([(80, 60), (50, 90)])],
            LABELS,
        )
    return directory / "model.safetensors", images, expected


def test_predict_cli_prints_ranked_table(setup):
    checkpoint, images, expected = setup
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_pl.predict",
            "--checkpoint",
            str(checkpoint),
            "--labels",
            ",".join(LABELS),
            *images,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == images
    for block, probabilities in zip(blocks, expected):
        rows = [re.fullmatch(r"\s+(.+?)\s+(\d+\.\d\d)%", line) for line in block.splitlines()[1:]]
        assert all(rows) and len(rows) == len(LABELS)
        labels, percents = [m.group(1) for m in rows], [float(m.group(2)) for m in rows]
        assert sum(percents) == pytest.approx(100, abs=0.03)
        assert percents == sorted(percents, reverse=True)
        # Each printed number is the model's probability for that label, rounded.
        for label, percent in zip(labels, percents):
            assert percent == pytest.approx(100 * probabilities[LABELS.index(label)].item(), abs=0.006)


def test_predict_json(setup, capsys, tmp_path):
    checkpoint, images, expected = setup
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n")
    args = ["--checkpoint", str(checkpoint), "--labels", " granny smith , ipod,pizza", "--json", *images]
    assert predict.main(args + ["--templates", str(templates)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == images
    for result, probabilities in zip(results, expected):
        got = {p["label"]: p["probability"] for p in result["predictions"]}
        assert got == pytest.approx({label: probabilities[i].item() for i, label in enumerate(LABELS)}, abs=1e-6)
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-5)

    assert predict.main(args + ["--top-k", "1"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert [p["label"] for p in top] == [LABELS[int(expected[0].argmax())]]


def test_template_ensemble_changes_the_result(setup, capsys):
    checkpoint, images, expected = setup
    args = ["--checkpoint", str(checkpoint), "--labels", ",".join(LABELS), "--json", images[0]]
    assert predict.main(args + ["--templates", "a drawing of the {label}."]) == 0
    got = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert sum(p["probability"] for p in got) == pytest.approx(1.0, abs=1e-5)
    assert {p["label"]: p["probability"] for p in got} != pytest.approx(
        {label: expected[0][i].item() for i, label in enumerate(LABELS)}, abs=1e-4
    )


@pytest.mark.parametrize("logit_bias", [None, -1.0])
def test_probabilities_are_a_softmax_for_clip_and_a_sigmoid_per_label_for_siglip(tmp_path, logit_bias):
    tokenizer = make_tokenizer(tmp_path)
    torch.manual_seed(3)
    text = {"vocab_size": tokenizer.vocab_size, "context_length": CONTEXT_LENGTH}
    model = create_model("tiny", text=text, init_logit_bias=logit_bias).eval()
    images = [random_image(20, (64, 48)), random_image(21, (40, 40))]
    preprocess = image_transform(model.preprocess_config)
    got = predict.predict(model, preprocess, tokenizer, images, LABELS)
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(image) for image in images]))
        logits = model.temperature() * image @ model.encode_text(tokenizer([f"a photo of a {x}." for x in LABELS])).T
    if logit_bias is None:
        torch.testing.assert_close(got, logits.softmax(dim=-1))
    else:
        torch.testing.assert_close(got, torch.sigmoid(logits + logit_bias))
        assert (got.sum(dim=-1) - 1).abs().min() > 0.05  # each label on its own, not shares of 1


@pytest.mark.parametrize(
    "labels, image, message",
    [
        ("pizza", None, "at least two"),
        ("pizza,,ipod", None, "at least two non-empty"),
        ("pizza,pizza", None, "duplicates"),
        ("pizza,ipod", "missing.png", "not found"),
        ("pizza,ipod", "not_an_image", "is not an image"),
    ],
)
def test_predict_errors(setup, tmp_path, capsys, labels, image, message):
    checkpoint, images, _ = setup
    (tmp_path / "not_an_image").write_text("hello")
    path = images[0] if image is None else str(tmp_path / image)
    assert predict.main(["--checkpoint", str(checkpoint), "--labels", labels, path]) == 2
    assert message in capsys.readouterr().err


def test_a_checkpoint_that_is_not_one_is_one_line(setup, tmp_path, capsys):
    _, images, _ = setup
    (tmp_path / "notes.ckpt").write_text("hello")
    assert predict.main(["--checkpoint", str(tmp_path / "notes.ckpt"), "--labels", "pizza,ipod", images[0]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes.ckpt' is not a clip_pl training checkpoint: torch.load failed (" in err
