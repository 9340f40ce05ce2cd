import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from gloo import gloo_group
from PIL import Image
from tiny_clip import CONTEXT_LENGTH, make_image_folder, make_model, make_tokenizer, random_image, write_checkpoint
from torch.utils.data import DataLoader

from clip_pl import evaluate
from clip_pl.distributed import free_port
from clip_pl.evaluation.metrics import accuracy, retrieval_recall
from clip_pl.evaluation.zero_shot import (
    DEFAULT_TEMPLATES,
    ZeroShotTask,
    build_zero_shot_classifier,
    classifier_from_text_features,
    fill_template,
    resolve_templates,
)
from data_pipelines import transforms
from data_pipelines.eval_data import LabelledShards
from data_pipelines.tokenizer import Tokenizer
from data_pipelines.transforms import image_transform

# ---------------------------------------------------------------- retrieval


def brute_force_recall(images, texts, ks, text_to_image=None):
    """Full score matrix, stable sort per query: the definition that retrieval_recall must match."""
    n, m = len(images), len(texts)
    text_to_image = torch.arange(m) if text_to_image is None else text_to_image
    scores = images.float() @ texts.float().T
    out = {}
    # Stable sort of the negated scores puts equal scores in index order.
    i2t_order = torch.sort(-scores, dim=1, stable=True).indices
    t2i_order = torch.sort(-scores.T, dim=1, stable=True).indices
    i2t_rank = [min(i2t_order[i].tolist().index(t) for t in range(m) if text_to_image[t] == i) for i in range(n)]
    t2i_rank = [t2i_order[t].tolist().index(int(text_to_image[t])) for t in range(m)]
    for k in ks:
        out[f"image_to_text_R@{k}"] = sum(r < k for r in i2t_rank) / n
    for k in ks:
        out[f"text_to_image_R@{k}"] = sum(r < k for r in t2i_rank) / m
    return out


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 53, 1000])
def test_retrieval_matches_brute_force(chunk_size):
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(53, 8, generator=g), dim=-1)
    texts = F.normalize(images + 0.6 * torch.randn(53, 8, generator=g), dim=-1)
    got = retrieval_recall(images, texts, ks=(1, 5, 10), chunk_size=chunk_size)
    expected = brute_force_recall(images, texts, (1, 5, 10))
    assert got == pytest.approx(expected, abs=1e-9)
    # Noisy captions: retrieval is neither perfect nor chance, so the comparison is informative.
    assert 0.1 < got["image_to_text_R@1"] < 0.9 and got["text_to_image_R@10"] > got["text_to_image_R@1"]


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_retrieval_ties_rank_by_index(chunk_size):
    # Features from {-1, 0, 1}^3 produce many exactly equal scores.
    g = torch.Generator().manual_seed(1)
    images = torch.randint(-1, 2, (40, 3), generator=g).float()
    texts = torch.randint(-1, 2, (40, 3), generator=g).float()
    got = retrieval_recall(images, texts, ks=(1, 3, 5), chunk_size=chunk_size)
    assert got == pytest.approx(brute_force_recall(images, texts, (1, 3, 5)), abs=1e-9)


def test_retrieval_all_scores_equal():
    # Every score ties: the stable order puts item i at rank i, so recall@k is exactly k / n.
    images, texts = torch.ones(10, 4), torch.ones(10, 4)
    got = retrieval_recall(images, texts, ks=(1, 5), chunk_size=3)
    assert got["image_to_text_R@1"] == pytest.approx(0.1)
    assert got["text_to_image_R@5"] == pytest.approx(0.5)


def test_retrieval_hand_computed():
    # Image 0 matches caption 0; image 1 prefers caption 0 over its own caption 1.
    images = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = retrieval_recall(images, texts, ks=(1, 2))
    assert got == {
        "image_to_text_R@1": 0.5,
        "image_to_text_R@2": 1.0,
        "text_to_image_R@1": 1.0,  # caption 0 -> image 0 (1.0 > 0.8), caption 1 -> image 1 (0.6 > 0)
        "text_to_image_R@2": 1.0,
    }


@pytest.mark.parametrize("chunk_size", [4, 100])
def test_retrieval_several_captions_per_image(chunk_size):
    g = torch.Generator().manual_seed(2)
    images = F.normalize(torch.randn(20, 6, generator=g), dim=-1)
    text_to_image = torch.arange(20).repeat_interleave(3)[torch.randperm(60, generator=g)]
    texts = F.normalize(images[text_to_image] + torch.randn(60, 6, generator=g), dim=-1)
    got = retrieval_recall(images, texts, ks=(1, 5), chunk_size=chunk_size, text_to_image_index=text_to_image)
    assert got == pytest.approx(brute_force_recall(images, texts, (1, 5), text_to_image), abs=1e-9)


class SizeRecorder(torch.Tensor):
    """Tensor subclass that records the element count of every tensor computed from it."""

    largest = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                SizeRecorder.largest = max(SizeRecorder.largest, tensor.numel())
        return out


def test_retrieval_never_builds_n_by_n():
    g = torch.Generator().manual_seed(3)
    n, chunk = 1200, 50
    images = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    texts = F.normalize(images + 0.3 * torch.randn(n, 16, generator=g), dim=-1)
    SizeRecorder.largest = 0
    got = retrieval_recall(
        images.as_subclass(SizeRecorder), texts.as_subclass(SizeRecorder), ks=(1, 5), chunk_size=chunk
    )
    assert SizeRecorder.largest == chunk * n  # one block of scores, never n * n
    assert got == pytest.approx(retrieval_recall(images, texts, ks=(1, 5), chunk_size=n), abs=1e-9)
    assert 0.1 < got["text_to_image_R@1"] < 1.0


def test_retrieval_rejects_mismatched_counts():
    with pytest.raises(ValueError, match="text_to_image_index"):
        retrieval_recall(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_recall(torch.randn(3, 4), torch.randn(3, 4), text_to_image_index=torch.tensor([0, 0, 1]))


# ---------------------------------------------------------------- accuracy and classifier


def test_accuracy_hand_computed():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 1, 2, 2])
    # Ranks of the true class: 0, 1, 1, 2.
    assert accuracy(logits, labels, topk=(1, 2, 3)) == {"top1": 0.25, "top2": 0.75, "top3": 1.0}
    # k beyond the class count is capped at it.
    assert accuracy(logits, labels, topk=(5,)) == {"top5": 1.0}


def test_classifier_from_text_features_averages_normalized_prompts():
    features = torch.tensor([[[3.0, 0.0], [0.0, 1.0]], [[0.0, -2.0], [0.0, -5.0]]])  # 2 classes x 2 templates
    weights = classifier_from_text_features(features)
    s = 2**-0.5
    # Class 0: mean of (1, 0) and (0, 1) renormalized; class 1: (0, -1). Lengths of raw prompts do not count.
    assert torch.allclose(weights, torch.tensor([[s, 0.0], [s, -1.0]]))


def test_zero_shot_known_answer_and_shuffled():
    g = torch.Generator().manual_seed(4)
    num_classes, dim = 10, 32
    centers = F.normalize(torch.randn(num_classes, dim, generator=g), dim=-1)
    prompts = centers[:, None, :] + 0.1 * torch.randn(num_classes, 5, dim, generator=g)
    classifier = classifier_from_text_features(prompts)
    labels = torch.arange(num_classes).repeat(4)
    images = F.normalize(centers[labels] + 0.05 * torch.randn(len(labels), dim, generator=g), dim=-1)
    assert accuracy(images @ classifier, labels) == {"top1": 1.0, "top5": 1.0}

    # Shuffled labels: the result must equal a per-sample count of the true class's rank.
    shuffled = labels[torch.randperm(len(labels), generator=g)]
    noisy = F.normalize(images + 0.5 * torch.randn(images.shape, generator=g), dim=-1)
    logits = noisy @ classifier
    ranks = [(logits[i] > logits[i, shuffled[i]]).sum().item() for i in range(len(labels))]
    expected = {"top1": sum(r < 1 for r in ranks) / len(ranks), "top5": sum(r < 5 for r in ranks) / len(ranks)}
    got = accuracy(logits, shuffled)
    assert got == pytest.approx(expected)
    assert got["top1"] < 0.5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    tokenizer = make_tokenizer(directory)
    model = make_model(tokenizer)
    return model, tokenizer, write_checkpoint(model, tokenizer, directory / "model.ckpt")


def test_build_zero_shot_classifier_matches_manual(tiny):
    model, tokenizer, _ = tiny
    classnames, templates = ["apple", "pizza", "dog"], ["a photo of a {}.", "a drawing of the {label}."]
    weights = build_zero_shot_classifier(model, tokenizer, classnames, templates, batch_size=4)
    assert weights.shape == (64, 3)
    with torch.no_grad():
        for c, name in enumerate(classnames):
            prompts = [t.replace("{label}", name).replace("{}", name) for t in templates]
            mean = model.encode_text(tokenizer(prompts)).mean(dim=0)
            assert torch.allclose(weights[:, c], mean / mean.norm(), atol=1e-5)


def test_templates():
    assert 20 <= len(DEFAULT_TEMPLATES) <= 30 and len(set(DEFAULT_TEMPLATES)) == len(DEFAULT_TEMPLATES)
    assert all(fill_template(t, "zebra").count("zebra") == 1 for t in DEFAULT_TEMPLATES)
    assert fill_template("a {label} with {braces}", "cat") == "a cat with {braces}"
    assert resolve_templates("itap of a {}.") == ["itap of a {}."]
    with pytest.raises(ValueError, match="placeholder"):
        resolve_templates(["a photo of a {}.", "no placeholder"])


def test_templates_from_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a photo of a {}.\n\n  a sketch of the {label}.  \n")
    assert resolve_templates(str(path)) == ["a photo of a {}.", "a sketch of the {label}."]


# ---------------------------------------------------------------- tasks and the CLI

CLASSES = ["granny_smith", "ipod", "pizza"]


def manual_folder_accuracy(model, tokenizer, root, classnames):
    """Accuracy recomputed image by image, without the evaluation module's data path."""
    transform = image_transform(model.preprocess_config)
    classifier = build_zero_shot_classifier(model, tokenizer, classnames, DEFAULT_TEMPLATES)
    correct = total = 0
    with torch.no_grad():
        for label, name in enumerate(CLASSES):
            for path in sorted((root / name).iterdir()):
                image = transform(Image.open(path)).unsqueeze(0)
                correct += int((model.encode_image(image) @ classifier).argmax().item() == label)
                total += 1
    return correct / total


def test_evaluate_cli_on_image_folder(tiny, tmp_path, capsys):
    model, tokenizer, checkpoint = tiny
    root = make_image_folder(tmp_path / "val", CLASSES, per_class=4)
    assert evaluate.main(["--checkpoint", str(checkpoint), "--zero-shot-folder", str(root)]) == 0
    table = capsys.readouterr().out
    top1 = next(line for line in table.splitlines() if "top1" in line)
    expected = manual_folder_accuracy(model, tokenizer, root, ["granny smith", "ipod", "pizza"])
    assert float(top1.split()[-1]) == pytest.approx(100 * expected, abs=0.01)
    assert "zero_shot/val" in top1


def _write_shard(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_labelled_shards_give_the_folder_result(tiny, tmp_path):
    model, tokenizer, _ = tiny
    root = make_image_folder(tmp_path / "val", CLASSES, per_class=3)
    samples_cls, samples_json = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((root / name).iterdir()):
            key = f"{name}_{path.stem}"
            samples_cls.append({"__key__": key, "png": path.read_bytes(), "cls": str(label)})
            samples_json.append({"__key__": key, "png": path.read_bytes(), "json": json.dumps({"y": {"id": label}})})
    _write_shard(tmp_path / "cls-0.tar", samples_cls[:5])
    _write_shard(tmp_path / "cls-1.tar", samples_cls[5:])
    _write_shard(tmp_path / "json-0.tar", samples_json)
    names = [c.replace("_", " ") for c in CLASSES]
    folder = ZeroShotTask("folder", str(root), templates=["a photo of a {}."], topk=(1, 2)).evaluate(model, tokenizer)
    shards = ZeroShotTask(
        "shards", str(tmp_path / "cls-{0..1}.tar"), classnames=names, templates=["a photo of a {}."], topk=(1, 2)
    ).evaluate(model, tokenizer)
    json_field = ZeroShotTask(
        "json", str(tmp_path / "json-0.tar"), names, ["a photo of a {}."], label_key="json:y.id", topk=(1, 2)
    ).evaluate(model, tokenizer)
    assert folder == shards == json_field
    assert set(folder) == {"top1", "top2"}


def test_shards_need_classnames_and_valid_labels(tiny, tmp_path):
    model, tokenizer, _ = tiny
    _write_shard(tmp_path / "s.tar", [{"__key__": "a", "png": _png(random_image(0)), "cls": "7"}])
    with pytest.raises(ValueError, match="needs classnames"):
        ZeroShotTask("t", str(tmp_path / "s.tar")).evaluate(model, tokenizer)
    with pytest.raises(ValueError, match="class index 7 has no class name"):
        ZeroShotTask("t", str(tmp_path / "s.tar"), classnames=["a", "b"]).evaluate(model, tokenizer)
    with pytest.raises(ValueError, match="no .label member"):
        task = ZeroShotTask("t", str(tmp_path / "s.tar"), classnames=["a", "b"], label_key="label")
        task.evaluate(model, tokenizer)


def test_evaluate_cli_retrieval_json(tiny, tmp_path, capsys):
    model, tokenizer, checkpoint = tiny
    captions = ["a red apple", "a slice of pizza", "a dog on the beach", "a cat on a sofa", "a blue car", "an ipod"]
    images = [random_image(i) for i in range(len(captions))]
    _write_shard(
        tmp_path / "pairs.tar",
        [{"__key__": f"{i:03d}", "png": _png(im), "txt": c} for i, (im, c) in enumerate(zip(images, captions))],
    )
    args = ["--checkpoint", str(checkpoint), "--retrieval-shards", str(tmp_path / "pairs.tar"), "--json"]
    assert evaluate.main(args + ["--batch-size", "4", "--chunk-size", "2"]) == 0
    results = json.loads(capsys.readouterr().out)
    transform = image_transform(model.preprocess_config)
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([transform(im) for im in images]))
        text_features = model.encode_text(tokenizer(captions))
    assert results["retrieval"] == pytest.approx(retrieval_recall(image_features, text_features), abs=1e-6)


def test_evaluate_cli_needs_data(tiny, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(tiny[2])])
    assert "nothing to evaluate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(tiny[2]), "--zero-shot-folder", "imagenet_typo/val"])
    assert "--zero-shot-folder 'imagenet_typo/val' is not a folder (for shards: --zero-shot-shards)" in (
        capsys.readouterr().err
    )


def test_accuracy_ties_rank_by_class_index():
    logits = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 0.0], [0.0, 2.0, 2.0]])
    labels = torch.tensor([2, 1, 1])
    # Ranks: 2 (two lower-indexed equals ahead), 1 (class 0 ties and comes first), 0.
    assert accuracy(logits, labels, topk=(1, 2, 3)) == {"top1": 1 / 3, "top2": 2 / 3, "top3": 1.0}


def test_nan_features_count_as_misses():
    # A diverged model must not report perfect scores.
    nan = torch.full((4, 3), float("nan"))
    assert retrieval_recall(nan, nan, ks=(1, 10)) == {
        "image_to_text_R@1": 0.0,
        "image_to_text_R@10": 0.0,
        "text_to_image_R@1": 0.0,
        "text_to_image_R@10": 0.0,
    }
    assert accuracy(nan, torch.tensor([0, 1, 2, 0]), topk=(1, 5)) == {"top1": 0.0, "top5": 0.0}


# ---------------------------------------------------------------- across ranks


def test_labelled_shards_split_between_ranks_and_workers_yield_each_sample_once(tmp_path):
    # 3 shards of 4, 4 and 2 samples; the label is the sample's number.
    sizes, number = (4, 4, 2), iter(range(10))
    for s, size in enumerate(sizes):
        _write_shard(tmp_path / f"s-{s}.tar", [
            {"__key__": f"{s}_{i}", "png": _png(random_image(0, (8, 8))), "cls": str(next(number))} for i in range(size)
        ])
    spec = str(tmp_path / "s-{0..2}.tar")
    # Up to 3 parts (ranks x workers) read their own shards; 4 and 6 decode every 4th or 6th sample,
    # which keeps ranks busy alike when there are fewer shards than parts.
    per_rank = {(1, 0): [10], (2, 0): [6, 4], (1, 2): [10], (2, 2): [6, 4], (3, 2): [4, 4, 2]}
    for (world_size, workers), counts in per_rank.items():
        seen = []
        for rank in range(world_size):
            shards = LabelledShards(spec, transforms.to_uint8_tensor, rank=rank, world_size=world_size)
            seen.append([label for _, label in DataLoader(shards, batch_size=None, num_workers=workers)])
        assert sorted(sum(seen, [])) == list(range(10)) and [len(s) for s in seen] == counts, (world_size, workers)


def _zero_shot_rank(rank, world_size, port, directory):
    directory = Path(directory)
    with gloo_group(rank, world_size, port):
        tokenizer = Tokenizer.from_file(directory / "tok.model", context_length=CONTEXT_LENGTH)
        model = make_model(tokenizer)
        out = {}
        for name, task in _tasks(directory).items():
            try:
                out[name] = task.evaluate(model, tokenizer, distributed=True)
            except Exception as exn:
                out[name] = f"{type(exn).__name__}: {exn}"
        out["classifier"] = build_zero_shot_classifier(model, tokenizer, CLASS_NAMES, ["a photo of a {}."], distributed=True)
        torch.save(out, directory / f"rank{rank}.pt")


CLASS_NAMES = [c.replace("_", " ") for c in CLASSES]


def _tasks(directory):
    return {
        "folder": ZeroShotTask("folder", str(directory / "val"), templates=["a photo of a {}."], topk=(1, 2)),
        "shards": ZeroShotTask("shards", str(directory / "s-{0..2}.tar"), CLASS_NAMES, ["a photo of a {}."], topk=(1, 2)),
        "bad": ZeroShotTask("bad", str(directory / "bad-{0..1}.tar"), CLASS_NAMES, ["a photo of a {}."]),
    }


# 4 ranks: one embeds no class (3 classes) and two read no sample of the 2-sample "bad" task.
@pytest.mark.parametrize("world_size", [2, 4])
def test_zero_shot_across_ranks_equals_one_process(tmp_path, world_size):
    tokenizer = make_tokenizer(tmp_path)
    model = make_model(tokenizer)
    root = make_image_folder(tmp_path / "val", CLASSES, per_class=5)
    samples = [
        {"__key__": f"{name}_{path.stem}", "png": path.read_bytes(), "cls": str(label)}
        for label, name in enumerate(CLASSES)
        for path in sorted((root / name).iterdir())
    ]
    for s in range(3):
        _write_shard(tmp_path / f"s-{s}.tar", samples[s::3])
    good = {"__key__": "ok", "png": _png(random_image(0)), "cls": "0"}
    _write_shard(tmp_path / "bad-0.tar", [good])
    _write_shard(tmp_path / "bad-1.tar", [{**good, "__key__": "bad", "cls": "7"}])  # rank 1's share only
    expected = {name: task.evaluate(model, tokenizer) for name, task in _tasks(tmp_path).items() if name != "bad"}
    assert expected["folder"] == expected["shards"] and 0 < expected["folder"]["top1"] < 1

    torch.multiprocessing.spawn(_zero_shot_rank, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size)
    classifier = build_zero_shot_classifier(model, tokenizer, CLASS_NAMES, ["a photo of a {}."])
    for rank in range(world_size):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        # Hit counts summed over ranks: exactly the one-process accuracy, on every rank.
        assert got["folder"] == expected["folder"] and got["shards"] == expected["shards"]
        torch.testing.assert_close(got["classifier"], classifier)
        if rank == 1:
            assert got["bad"].startswith("ValueError: class index 7 has no class name"), got["bad"]
        else:
            assert got["bad"] == "RuntimeError: zero-shot evaluation failed on 1 other rank(s); their error is in their log"
