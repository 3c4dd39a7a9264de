"""Tracking sinks against the real libraries: what is logged is read back from each tracker's own files."""

from __future__ import annotations

import json
import struct
import sys

import pytest

from vlmtrain.config import ConfigError, TrackingConfig
from vlmtrain.metrics import tracking
from vlmtrain.metrics.tracking import FanoutSink, open_tracking

# Three steps with distinct values per key and step; the non-numeric entries must be skipped by every tracker.
LOGGED = {
    10: {"loss/train": 2.5, "throughput/samples_per_s": 120.25, "optim/lr": 1e-4},
    20: {"loss/train": 1.75, "throughput/samples_per_s": 131.5, "optim/lr": 2e-4},
    30: {"loss/train": 1.125, "throughput/samples_per_s": 99.0, "optim/lr": 3e-4},
}
NOT_SCALARS = {"data/lengths": [3, 5], "run/phase": "train", "eval/done": True}
# 150 extra keys so MLflow's 100-params-per-batch limit is crossed; one value over its 6000-character limit.
CONFIG = {"optim": {"lr": 0.0001, "betas": [0.9, 0.95]}, "data": {"prompt": "x" * 7000},
          "many": {f"k{i}": i for i in range(150)}}


def log_all(sinks) -> None:
    sink = FanoutSink(sinks)
    for step, metrics in LOGGED.items():
        sink.log(step, {**metrics, **NOT_SCALARS})
    sink.close()


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_all(open_tracking(TrackingConfig(tensorboard=True), tmp_path, CONFIG, "run-a"))
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss/train", "optim/lr", "throughput/samples_per_s"]
    for key in LOGGED[10]:
        events = acc.Scalars(key)
        assert [e.step for e in events] == [10, 20, 30]
        for e in events:
            assert e.value == pytest.approx(LOGGED[e.step][key], rel=1e-6)  # stored as float32


def wandb_records(path):
    """The records of a ``.wandb`` transaction log (wandb 0.31 ships no reader for it).

    Its format is LevelDB's log: a 7-byte file header (``:W&B``, magic, version), then 32 KiB blocks of
    chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); a block's
    tail too short for a header is padding.
    """
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_history_and_config_read_back(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tcfg = TrackingConfig(wandb=True, wandb_project="proj", wandb_mode="offline")
    log_all(open_tracking(tcfg, tmp_path, CONFIG, "run-a"))

    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    (log_file,) = run_dirs[0].glob("*.wandb")
    history, run = {}, None
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    assert history == LOGGED  # JSON keeps the float64 values exactly; the non-scalars are absent
    assert (run.project, run.display_name) == ("proj", "run-a")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["optim"] == {"lr": 0.0001, "betas": [0.9, 0.95]}
    assert config["many"]["k149"] == 149


def test_mlflow_default_file_store_read_back(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    # The sink opts in to MLflow 3's file store via this variable; leave the environment as it was found.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    (sink,) = open_tracking(TrackingConfig(mlflow=True, mlflow_experiment="exp"), tmp_path, CONFIG, "run-a")
    log_all([sink])

    client = MlflowClient((tmp_path / "mlruns").resolve().as_uri())
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert client.get_experiment(run.info.experiment_id).name == "exp"
    assert sorted(run.data.metrics) == ["loss/train", "optim/lr", "throughput/samples_per_s"]
    for key in LOGGED[10]:
        history = sorted(client.get_metric_history(sink.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(step, LOGGED[step][key]) for step in (10, 20, 30)]
    params = run.data.params
    assert len(params) == 153  # all 150 "many.*" + optim.lr, optim.betas, data.prompt: every batch landed
    assert params["optim.lr"] == "0.0001" and params["optim.betas"] == "[0.9, 0.95]"
    assert params["many.k149"] == "149" and params["data.prompt"] == "x" * 6000


@pytest.mark.parametrize("flag", ["tensorboard", "wandb", "mlflow"])
def test_missing_library_names_the_extra(tmp_path, monkeypatch, flag):
    monkeypatch.setitem(sys.modules, flag, None)  # makes `import <flag>` raise ImportError
    with pytest.raises(ConfigError) as err:
        open_tracking(TrackingConfig(**{flag: True}), tmp_path, CONFIG, "run-a")
    assert str(err.value) == f"tracking.{flag}=true needs the {flag} package: pip install 'vlmtrain[{flag}]'"


class FakeSink:
    def __init__(self, fail: str = ""):
        self.fail, self.logged, self.closed = fail, [], False

    def log(self, step, metrics):
        self.logged.append((step, metrics))

    def close(self):
        self.closed = True
        if self.fail:
            raise RuntimeError(self.fail)


def test_open_tracking_closes_opened_sinks_when_a_later_one_fails(tmp_path, monkeypatch):
    opened = FakeSink()
    monkeypatch.setattr(tracking, "TensorBoardSink", lambda log_dir: opened)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"vlmtrain\[mlflow\]"):
        open_tracking(TrackingConfig(tensorboard=True, mlflow=True), tmp_path, CONFIG, "run-a")
    assert opened.closed


def test_nothing_enabled_opens_nothing(tmp_path):
    assert open_tracking(TrackingConfig(), tmp_path, CONFIG, "run-a") == []


def test_fanout_logs_to_all_and_closes_all_when_some_raise():
    sinks = [FakeSink(), FakeSink(fail="first"), FakeSink(), FakeSink(fail="second")]
    fan = FanoutSink(sinks)
    fan.log(7, {"loss/train": 1.0})
    assert [s.logged for s in sinks] == [[(7, {"loss/train": 1.0})]] * 4
    with pytest.raises(RuntimeError, match="^first$"):
        fan.close()
    assert all(s.closed for s in sinks)
