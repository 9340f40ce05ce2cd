"""The suite's numbers equal clip_benchmark's, for one model exported to open_clip and the same datasets.

clip_benchmark (the pip package) runs as its ``clip_benchmark eval`` does for ``wds/`` datasets: its
``build_dataset`` reads the folders, open_clip loads the export (``local-dir:``) and gives the
transform and tokenizer, and its metric functions score, in fp32 (``--no_amp``). clip_pl runs the
``python -m clip_pl.evaluate --suite`` command on the training checkpoint.
"""

import io
import json

import open_clip
import pytest
import torch
from benchmark_sets import FORMATS, image_bytes, write_classification, write_multilabel, write_retrieval
from PIL import Image
from test_export_openclip import load_export, openclip_folder
from test_openclip_models import small
from tiny_clip import write_checkpoint

from clip_pl import evaluate
from clip_pl.export import main as export_main
from clip_pl.model_files.openclip_models import load_openclip
from data_pipelines.transforms import image_transform

clip_benchmark_builder = pytest.importorskip("clip_benchmark.datasets.builder")
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval  # noqa: E402

# clip_pl's name of each clip_benchmark metric. clip_benchmark's "image retrieval" finds the image
# of a caption (text to image), its "text retrieval" the captions of an image.
NAMES = {
    "acc1": "top1",
    "acc5": "top5",
    "mean_per_class_recall": "mean_per_class_recall",
    "mean_average_precision": "mean_average_precision",
    **{f"image_retrieval_recall@{k}": f"text_to_image_R@{k}" for k in (1, 5, 10)},
    **{f"text_retrieval_recall@{k}": f"image_to_text_R@{k}" for k in (1, 5, 10)},
    "mean_recall@1": "mean_R@1",
}


def _accuracy(output, target, topk=(1,)):
    # clip_benchmark 1.6.2's accuracy, with .item() where it calls float() on a one-element array,
    # which numpy 2 refuses (https://github.com/LAION-AI/CLIP_benchmark/issues/147).
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def clip_benchmark_metrics(name, root, task, model, preprocess, tokenizer, monkeypatch):
    monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy)
    dataset = clip_benchmark_builder.build_dataset(f"wds/{name}", root=str(root), transform=preprocess,
                                                   split="test", task=task)
    loader = torch.utils.data.DataLoader(dataset.batched(5), batch_size=None)
    if task == "zeroshot_retrieval":
        return zeroshot_retrieval.evaluate(model, loader, tokenizer, device="cpu", amp=False, recall_k_list=[1, 5, 10])
    return zeroshot_classification.evaluate(
        model, loader, tokenizer, dataset.classes, dataset.templates, device="cpu", amp=False
    )


def test_the_suite_equals_clip_benchmark_on_an_exported_model(tmp_path, monkeypatch):
    openclip_folder(tmp_path / "source", small("ViT-B-32", image_size=64))
    model, tokenizer = load_openclip(tmp_path / "source")
    write_checkpoint(model, tokenizer, tmp_path / "last.ckpt")
    assert export_main(["--format", "open_clip", str(tmp_path / "last.ckpt"), str(tmp_path / "export")]) == 0
    exported, preprocess = load_export(tmp_path / "export")
    openclip_tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'export'}")

    sets = {
        "classes": ("zeroshot_classification", write_classification),
        "labels": ("zeroshot_classification", write_multilabel),
        "captions": ("zeroshot_retrieval", write_retrieval),
    }
    for name, (_, write) in sets.items():
        write(tmp_path / "data" / f"wds_{name}")
    suite = tmp_path / "suite.yaml"
    suite.write_text("dataset_root: 'wds_{dataset}'\ndatasets:\n" + "".join(
        f"  - {{name: {name}, task: {task}}}\n" for name, (task, _) in sets.items()
    ))
    output = tmp_path / "results.json"
    assert evaluate.main([
        "--checkpoint", str(tmp_path / "last.ckpt"), "--suite", str(suite), "--suite-root", str(tmp_path / "data"),
        "--output", str(output), "--precision", "fp32", "--batch-size", "4",
    ]) == 0
    ours = json.loads(output.read_text())["datasets"]

    compared = 0
    for name, (task, _) in sets.items():
        theirs = clip_benchmark_metrics(name, tmp_path / "data" / f"wds_{name}", task, exported, preprocess,
                                        openclip_tokenizer, monkeypatch)
        if task == "zeroshot_retrieval":
            # DataComp's mean_recall@1, added to clip_benchmark's metrics by DataComp's evaluation.
            theirs["mean_recall@1"] = (theirs["image_retrieval_recall@1"] + theirs["text_retrieval_recall@1"]) / 2
        assert ours[name]["metrics"].keys() == {NAMES[k] for k in theirs}
        for metric, value in theirs.items():
            assert ours[name]["metrics"][NAMES[metric]] == pytest.approx(value, abs=1e-6), (name, metric)
            compared += 1
        # A test on numbers that are all 0 or all 1 would prove little.
        assert any(0 < value < 1 for value in theirs.values()), (name, theirs)
    assert compared == 3 + 1 + 7


def test_evaluation_sees_the_pixels_open_clip_sees(tmp_path):
    """Resize, crop and normalization of a PIL image equal open_clip's preprocessing of an export.

    Metrics of a tiny random model rarely move when pixels differ by one level, so the pixels
    themselves are compared: torchvision's resize of a tensor differs from PIL's by up to 1/255.
    """
    openclip_folder(tmp_path / "source", small("ViT-B-32", image_size=64))
    model, tokenizer = load_openclip(tmp_path / "source")
    write_checkpoint(model, tokenizer, tmp_path / "last.ckpt")
    assert export_main(["--format", "open_clip", str(tmp_path / "last.ckpt"), str(tmp_path / "export")]) == 0
    _, preprocess = load_export(tmp_path / "export")
    ours = image_transform(model.preprocess_config)
    for seed in range(12):
        image = Image.open(io.BytesIO(image_bytes(seed, FORMATS[seed % 3])))
        assert image.size != (64, 64)
        torch.testing.assert_close(ours(image), preprocess(image), rtol=0, atol=1e-6)
