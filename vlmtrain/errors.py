"""User-facing errors of a run that are not config errors: the CLI prints each as one line and exits 2."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (unreadable, truncated, or of another model or backend);
    the message names the checkpoint directory."""


class NonFiniteError(RuntimeError):
    """A run stopped because a step's loss or gradient norm was NaN/Inf (``train.on_nonfinite=stop``)
    or the weights became non-finite; the message names the step and the samples it trained on. The
    CLI prints it as one line and exits 1: it is a training failure, not a bad input."""


class UsageError(ValueError):
    """A bad command-line input that is not a config key (a path that is neither a config nor a run
    directory, a wrong count of values); the CLI prints it as one line and exits 2."""
