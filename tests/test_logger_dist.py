"""logger (upstream API, csv/log outputs) and dist_util (single-process behaviour, launcher detection)."""
import csv
import json

import torch

from guided_diffusion import dist_util, logger


def test_logger_writes_csv_json_and_log(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["log", "csv", "json"])
    assert logger.get_dir() == str(tmp_path)
    logger.logkv("step", 0)
    logger.logkv_mean("loss", 1.0)
    logger.logkv_mean("loss", 3.0)
    row = logger.dumpkvs()
    assert row["loss"] == 2.0
    logger.logkv("step", 1)
    logger.logkv("loss", 0.5)
    logger.logkv("lr", 1e-4)  # a new column: the csv header widens, the old row keeps a blank
    logger.dumpkvs()
    logger.log("hello", "world")
    with open(tmp_path / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "1"]
    assert rows[0]["lr"] == "" and float(rows[1]["lr"]) == 1e-4
    assert float(rows[0]["loss"]) == 2.0
    lines = (tmp_path / "progress.json").read_text().splitlines()
    assert json.loads(lines[1])["loss"] == 0.5
    text = (tmp_path / "log.txt").read_text()
    assert "hello world" in text and "| loss" in text


def test_logger_resumed_csv_appends(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    logger.logkv("step", 0)
    logger.dumpkvs()
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    logger.logkv("step", 1)
    logger.dumpkvs()
    with open(tmp_path / "progress.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["0", "1"]


def test_default_log_dir_is_not_tmp():
    d = logger.default_log_dir("cifar")
    assert d.startswith("runs/cifar-") and "/tmp" not in d


def test_launcher_detection(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(v, raising=False)
    assert dist_util.launcher() == "single"
    monkeypatch.setenv("PMI_SIZE", "2")
    assert dist_util.launcher() == "mpi"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert dist_util.launcher() == "torchrun"


def test_single_process_helpers(tmp_path):
    assert dist_util.dev().type in ("cpu", "cuda")
    assert dist_util.get_rank() == 0 and dist_util.get_world_size() == 1 and dist_util.is_main_process()
    t = torch.tensor([2.0, 4.0])
    assert torch.equal(dist_util.all_reduce_mean(t), torch.tensor([2.0, 4.0]))
    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(3)}, path)
    assert torch.equal(dist_util.load_state_dict(str(path))["w"], torch.arange(3))
    try:
        dist_util.load_state_dict(str(tmp_path / "missing.pt"))
    except FileNotFoundError as e:
        assert "missing.pt" in str(e)
    else:
        raise AssertionError("expected FileNotFoundError")
