"""User-facing errors of a run that are not config errors: the CLI prints each as one line and exits 2."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (unreadable, truncated, or of another model or backend);
    the message names the checkpoint directory."""
