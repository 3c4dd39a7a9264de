"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) as sinks of the ``log``/``close`` protocol.

Each library is optional and imported only when its sink is built, so a plain install never pays for (or
needs) them; an enabled tracker whose library is missing is a ``ConfigError`` naming the pip extra.
"""

from __future__ import annotations

import contextlib
import importlib
import numbers
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vlmtrain.config import ConfigError, TrackingConfig
from vlmtrain.metrics.sinks import Sink

# MLflow's limits: a param value is at most 6000 characters, one log_batch call at most 100 params / 1000 metrics.
_MLFLOW_PARAM_CHARS = 6000
_MLFLOW_BATCH_PARAMS = 100
_MLFLOW_BATCH_METRICS = 1000


def _require(module: str, flag: str, package: str, extra: str) -> Any:
    """Import ``module`` or raise a one-line ConfigError telling the user which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"tracking.{flag}=true needs the {package} package: pip install 'vlmtrain[{extra}]'"
        ) from e


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of a dict; lists, strings and bools are left to metrics.jsonl."""
    # numbers.Real also admits NumPy scalars (np.float32 is no float subclass); bool is an int, but not a metric.
    return {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dicts as dotted keys with string values (``{"optim.lr": "0.0001"}``)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:_MLFLOW_PARAM_CHARS]
    return flat


class TensorBoardSink:
    """Scalars to TensorBoard event files in ``log_dir``."""

    def __init__(self, log_dir: str | Path):
        # torch.utils.tensorboard may already be imported; import the package itself so a missing one is caught.
        _require("tensorboard", "tensorboard", "tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One scalar per numeric metric at ``step``; flushed so a killed run keeps its points."""
        for key, value in _numeric(metrics).items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


class WandbSink:
    """A Weights & Biases run; ``mode="offline"`` writes under ``directory/wandb`` for a later ``wandb sync``."""

    def __init__(self, project: str, run_name: str, mode: str, directory: str | Path, config: dict[str, Any]):
        wandb = _require("wandb", "wandb", "wandb", "wandb")
        Path(directory).mkdir(parents=True, exist_ok=True)  # wandb falls back to a temp dir if it is missing
        self._run = wandb.init(project=project, name=run_name or None, mode=mode, dir=str(directory), config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """The numeric metrics at ``step`` (W&B drops steps lower than one already logged)."""
        self._run.log(_numeric(metrics), step=step)

    def close(self) -> None:
        """Finish the run (writes the summary; syncs it when online)."""
        self._run.finish()


class MlflowSink:
    """An MLflow run: the config as params, metrics per step.

    Uses an ``MlflowClient`` bound to ``uri`` rather than the fluent ``mlflow.*`` API, so nothing process-wide
    (tracking URI, active run) is set that user code or a second run in the process could trip over.
    """

    def __init__(self, uri: str, experiment: str, run_name: str, config: dict[str, Any]):
        _require("mlflow", "mlflow", "mlflow", "mlflow")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        if urlparse(uri).scheme in ("", "file"):
            # MLflow 3 refuses its file store unless opted in; it needs no server or database (and
            # mlflow-skinny has no SQLAlchemy for sqlite://), so opt in unless the user decided otherwise.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = MlflowClient(tracking_uri=uri)
        found = self._client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
        self.run_id = self._client.create_run(experiment_id, run_name=run_name or None).info.run_id
        params = [Param(k, v) for k, v in _flatten(config).items()]
        for i in range(0, len(params), _MLFLOW_BATCH_PARAMS):
            self._client.log_batch(self.run_id, params=params[i:i + _MLFLOW_BATCH_PARAMS])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """The numeric metrics at ``step``, one batch call per 1000."""
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        batch = [Metric(k, v, now_ms, step) for k, v in _numeric(metrics).items()]
        for i in range(0, len(batch), _MLFLOW_BATCH_METRICS):
            self._client.log_batch(self.run_id, metrics=batch[i:i + _MLFLOW_BATCH_METRICS])

    def close(self) -> None:
        """Mark the run finished."""
        self._client.set_terminated(self.run_id)


class FanoutSink:
    """One sink that logs to several (metrics.jsonl plus the trackers)."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = list(sinks)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Log to every sink in order."""
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        """Close every sink, even after one fails (so no file or run is left open); re-raise the first error."""
        first: BaseException | None = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001 - collected and re-raised below
                first = first or e
        if first is not None:
            raise first


def open_tracking(tcfg: TrackingConfig, output_dir: Path, config: dict[str, Any], run_name: str) -> list[Sink]:
    """The sinks of the enabled trackers (rank 0 only): TensorBoard at ``output_dir/tensorboard``, W&B under
    ``output_dir/wandb``, MLflow at ``tcfg.mlflow_uri`` (default: the file store ``output_dir/mlruns``).

    ``config`` (e.g. ``dataclasses.asdict(cfg)``) becomes the W&B config and the MLflow params. Raises
    ConfigError when an enabled tracker's library is missing; the sinks opened before it are closed first.
    """
    output_dir = Path(output_dir)
    openers = []
    if tcfg.tensorboard:
        openers.append(lambda: TensorBoardSink(output_dir / "tensorboard"))
    if tcfg.wandb:
        name = tcfg.wandb_run_name or run_name or output_dir.name
        openers.append(lambda: WandbSink(tcfg.wandb_project, name, tcfg.wandb_mode, output_dir, config))
    if tcfg.mlflow:
        uri = tcfg.mlflow_uri or (output_dir / "mlruns").resolve().as_uri()
        openers.append(lambda: MlflowSink(uri, tcfg.mlflow_experiment, run_name or output_dir.name, config))
    sinks: list[Sink] = []
    try:
        for opener in openers:
            sinks.append(opener())
    except BaseException:
        # Don't leave a W&B run or an event file dangling when a later tracker cannot start; the
        # start-up error is the one to report.
        with contextlib.suppress(Exception):
            FanoutSink(sinks).close()
        raise
    return sinks
