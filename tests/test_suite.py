"""Suites of clip_benchmark datasets: the command, its one-line errors, ranks, and validation during training."""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from benchmark_sets import write_classification, write_multilabel, write_retrieval
from gloo import gloo_group
from test_train import compose_train, demo_overrides  # noqa: F401 (a fixture)
from tiny_clip import CONTEXT_LENGTH, make_model, make_tokenizer, write_checkpoint

import train
from clip_pl import evaluate
from clip_pl.distributed import free_port
from clip_pl.evaluation.suite import Suite, SuiteDataset, shipped_suites
from clip_pl.model_files.load import load
from data_pipelines.tokenizer import Tokenizer

SETS = {
    "classes": ("zeroshot_classification", write_classification),
    "labels": ("zeroshot_classification", write_multilabel),
    "captions": ("zeroshot_retrieval", write_retrieval),
}


def write_sets(root: Path) -> None:
    for name, (_, write) in SETS.items():
        write(root / f"wds_{name}")


def suite_entries() -> list[SuiteDataset]:
    return [SuiteDataset(name, task, "wds_{dataset}", groups=("all",)) for name, (task, _) in SETS.items()]


def write_suite(path: Path, extra: str = "") -> Path:
    path.write_text("dataset_root: 'wds_{dataset}'\ndatasets:\n" + "".join(
        f"  - {{name: {name}, task: {task}, groups: [all]}}\n" for name, (task, _) in SETS.items()
    ) + extra)
    return path


@pytest.fixture
def model_files(tmp_path):
    tokenizer = make_tokenizer(tmp_path)
    model = make_model(tokenizer)
    return model, tokenizer, write_checkpoint(model, tokenizer, tmp_path / "last.ckpt")


def test_the_shipped_suites_read():
    assert {"datacomp", "imagenet"} <= set(shipped_suites())
    datacomp = Suite.from_file("datacomp")
    assert len(datacomp.datasets) == 33 and len({d.name for d in datacomp.datasets}) == 33
    groups = {}
    for dataset in datacomp.datasets:
        for group in dataset.groups:
            groups[group] = groups.get(group, 0) + 1
    assert groups == {"ImageNet": 1, "ImageNet dist. shifts": 6, "VTAB": 13, "Retrieval": 2}
    coco = next(d for d in datacomp.datasets if d.name == "mscoco_captions")
    assert coco.folder("/data") == "/data/wds_mscoco_captions"
    assert datacomp.datasets[7].folder("/data") == "/data/wds_vtab-caltech101_test"


def test_the_command_skips_a_missing_dataset_in_one_line_and_writes_json(model_files, tmp_path, capsys):
    model, tokenizer, checkpoint = model_files
    write_sets(tmp_path / "data")
    suite = write_suite(tmp_path / "suite.yaml", "  - {name: gone, task: zeroshot_classification, groups: [all]}\n")
    output = tmp_path / "out" / "results.json"
    code = evaluate.main(["--checkpoint", str(checkpoint), "--suite", str(suite), "--suite-root",
                          str(tmp_path / "data"), "--output", str(output), "--batch-size", "4"])
    out, err = capsys.readouterr()
    assert code == 0
    assert err.strip().splitlines() == [f"gone: no dataset folder {tmp_path / 'data' / 'wds_gone'}"]
    assert "average of 3 of 4 datasets" in out and f"skipped gone: no dataset folder {tmp_path}" in out
    results = json.loads(output.read_text())
    assert results["skipped"] == {"gone": f"no dataset folder {tmp_path / 'data' / 'wds_gone'}"}
    assert results["datasets_evaluated"] == 3 and results["datasets_listed"] == 4
    # The JSON holds what the API computes, and the average is over the main metrics.
    expected = Suite("suite", suite_entries(), root=tmp_path / "data", batch_size=5).run(model, tokenizer)
    for name, result in expected.datasets.items():
        assert results["datasets"][name]["metrics"] == pytest.approx(result.metrics, abs=1e-6)
    mains = [results["datasets"][n]["metrics"][m] for n, m in
             (("classes", "top1"), ("labels", "mean_average_precision"), ("captions", "mean_R@1"))]
    assert results["average"] == pytest.approx(sum(mains) / 3, abs=1e-12)
    assert results["groups"]["all"] == {"average": pytest.approx(sum(mains) / 3, abs=1e-12), "datasets": 3, "of": 4}


def test_a_task_unlike_its_folder_fails_that_dataset_only(model_files, tmp_path, capsys):
    _, _, checkpoint = model_files
    write_sets(tmp_path / "data")
    suite = tmp_path / "suite.yaml"
    suite.write_text(textwrap.dedent("""\
        datasets:
          - {name: classes, task: zeroshot_retrieval, root: "wds_{dataset}"}
          - {name: captions, task: zeroshot_retrieval, root: "wds_{dataset}"}
    """))
    code = evaluate.main(["--checkpoint", str(checkpoint), "--suite", str(suite), "--suite-root",
                          str(tmp_path / "data"), "--output", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert code == 1
    assert err.strip() == (f"classes: {tmp_path / 'data' / 'wds_classes'} holds a classification set (its "
                           "dataset_type.txt) but the suite says task: zeroshot_retrieval; correct the task")
    assert list(json.loads((tmp_path / "r.json").read_text())["datasets"]) == ["captions"]


@pytest.mark.parametrize("contents, message", [
    ("datasets: [", "is not valid YAML at line 1: expected the node content"),
    ("datasets: []", "needs a non-empty 'datasets:' list"),
    ("datasets:\n  - {name: a, task: classify, root: x}", "dataset a needs task: zeroshot_classification or"),
    ("datasets:\n  - {name: a, task: zeroshot_retrieval, roots: x}", "dataset a has unknown keys ['roots']"),
    ("datasets:\n  - {name: a, task: zeroshot_retrieval}", "dataset a has no root, and the file no dataset_root"),
    ("datasets:\n  - {name: a, task: zeroshot_retrieval, root: x, main_metric: acc1}", "main_metric 'acc1'; known: top1"),
    ("datasets:\n  - {name: a, task: zeroshot_retrieval, root: 'x/{0..3}'}", "may hold only {dataset} and"),
    ("dataset_root: x\ndatasets:\n  - {name: a, task: zeroshot_retrieval}\n  - {name: a, task: zeroshot_retrieval}",
     "dataset a is listed twice"),
])
def test_a_mistaken_suite_file_is_one_line(model_files, tmp_path, capsys, contents, message):
    (tmp_path / "suite.yaml").write_text(contents)
    code = evaluate.main(["--checkpoint", str(model_files[2]), "--suite", str(tmp_path / "suite.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_an_unknown_suite_name_lists_the_shipped_ones(model_files, capsys):
    assert evaluate.main(["--checkpoint", str(model_files[2]), "--suite", "datacmp"]) == 2
    assert capsys.readouterr().err.strip() == "error: no suite file 'datacmp'; give a YAML file or one of: datacomp, imagenet"


def _suite_rank(rank, world_size, port, directory):
    directory = Path(directory)
    with gloo_group(rank, world_size, port):
        tokenizer = Tokenizer.from_file(directory / "tok.model", context_length=CONTEXT_LENGTH)
        suite = Suite("s", suite_entries(), root=directory / "data", batch_size=3)
        torch.save(suite.evaluate(make_model(tokenizer), tokenizer, distributed=True), directory / f"rank{rank}.pt")


# 3 ranks: the 2-shard sets are read sample by sample, and the 17-sample multi-label set splits unevenly.
@pytest.mark.parametrize("world_size", [2, 3])
def test_the_suite_across_ranks_equals_one_process(tmp_path, world_size):
    tokenizer = make_tokenizer(tmp_path)
    write_sets(tmp_path / "data")
    expected = Suite("s", suite_entries(), root=tmp_path / "data", batch_size=4).evaluate(make_model(tokenizer), tokenizer)
    assert len(expected) == 3 + 1 + 7 + 2  # the metrics, the average and the group's
    torch.multiprocessing.spawn(_suite_rank, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size)
    for rank in range(world_size):
        assert torch.load(tmp_path / f"rank{rank}.pt") == pytest.approx(expected, abs=1e-6), rank


def test_training_validates_the_suite_of_its_config(demo_overrides, tmp_path):  # noqa: F811
    write_sets(tmp_path / "data")
    write_suite(tmp_path / "suite.yaml")
    cfg = compose_train([*demo_overrides, f"run_dir={tmp_path / 'run'}", "trainer.max_steps=3",
                         f"suite.file={tmp_path / 'suite.yaml'}", f"suite.root={tmp_path / 'data'}",
                         "suite.num_workers=0"])
    metrics = train.train(cfg)
    model, _, tokenizer = load(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    expected = Suite("suite", suite_entries(), root=tmp_path / "data").run(model, tokenizer)
    logged = {k.removeprefix("zero_shot/suite/"): v for k, v in metrics.items() if k.startswith("zero_shot/suite/")}
    assert logged.keys() == expected.flat().keys()
    assert logged == pytest.approx(expected.flat(), abs=1e-5)


def test_a_suite_reads_datasets_over_http(model_files, tmp_path):
    """An http(s) folder is read as a local one: the text files fetched, the shards streamed."""
    import functools
    import http.server
    import threading

    from data_pipelines.eval_data import read_benchmark_folder

    model, tokenizer, _ = model_files
    write_sets(tmp_path / "data")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "data"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        folder = read_benchmark_folder(f"{url}/wds_classes")
        assert folder.kind == "classification" and folder.urls == (f"{url}/wds_classes/test/0.tar",
                                                                     f"{url}/wds_classes/test/1.tar")
        remote = Suite("s", suite_entries(), root=url).run(model, tokenizer)
        with pytest.raises(FileNotFoundError, match="no test/nshards.txt in http"):
            read_benchmark_folder(f"{url}/wds_gone")
    finally:
        server.shutdown()
    local = Suite("s", suite_entries(), root=tmp_path / "data").run(model, tokenizer)
    assert remote.flat() == local.flat() and len(remote.datasets) == 3


def test_a_hugging_face_page_reads_text_under_raw_and_shards_under_resolve():
    from data_pipelines.eval_data import _metadata_and_shard_roots

    page = "https://huggingface.co/datasets/clip-benchmark/wds_vtab-cifar10/tree/main"
    assert _metadata_and_shard_roots(page) == (
        "https://huggingface.co/datasets/clip-benchmark/wds_vtab-cifar10/raw/main",
        "https://huggingface.co/datasets/clip-benchmark/wds_vtab-cifar10/resolve/main",
    )
    assert _metadata_and_shard_roots("/data/wds_x") == ("/data/wds_x", "/data/wds_x")
