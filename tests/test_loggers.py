import os

from clip_pl.training.loggers import stable_run_id, wandb_logger


def test_wandb_goes_offline_without_key_and_keeps_its_run_id(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    first = wandb_logger(str(tmp_path / "run"), name="r")
    assert os.environ["WANDB_MODE"] == "offline"
    resumed = wandb_logger(str(tmp_path / "run"), name="r")
    assert first._wandb_init["id"] == resumed._wandb_init["id"]
    assert resumed._wandb_init["resume"] == "allow"
    assert (tmp_path / "run" / "wandb_id.txt").read_text() == first._wandb_init["id"]


def test_run_id_differs_between_run_dirs(tmp_path):
    assert stable_run_id(str(tmp_path / "a")) != stable_run_id(str(tmp_path / "b"))
    assert stable_run_id(str(tmp_path / "a")) == stable_run_id(str(tmp_path / "a"))
