"""Data errors that name the file and the record, and a policy that raises or skips them.

Readers never decide on their own whether a bad record is fatal: they build a `DataError` and hand
it to an `ErrorPolicy`. In ``raise`` mode the first bad record stops the run with a message that
names the file and the episode; in ``skip`` mode the record is dropped and counted by reason, so a
run over a large, slightly dirty corpus can finish and still report exactly what it left out.
"""

from __future__ import annotations

from collections import Counter
from os import PathLike
from pathlib import Path

__all__ = ["DataError", "ErrorPolicy", "ON_ERROR_CHOICES"]

ON_ERROR_CHOICES: tuple[str, ...] = ("raise", "skip")

# Enough to show the pattern of a failure without letting a corpus with 10^5 bad rows fill memory.
_EXAMPLES_PER_REASON = 5


def _format_record(record: int | str | None) -> str | None:
    """Render a record id: a bare int is an episode index, anything else is shown as given."""
    if record is None:
        return None
    # bool is an int subclass, but "episode True" would only confuse.
    if isinstance(record, int) and not isinstance(record, bool):
        return f"episode {record}"
    return str(record)


class DataError(ValueError):
    """One bad record (or file) in a dataset.

    Attributes:
        path: the file at fault (the parquet, the frame, the metadata file).
        record: which record inside it: an episode index (int) or a free label such as ``"line 3"``;
            None when the whole file is at fault.
        reason: short machine-friendly code (``missing_frame``, ``length_mismatch``,
            ``missing_column``, ``unknown_action``, ``bad_json``, ``missing_file``, ...), used to
            count skipped records.
        detail: human-readable explanation (numbers, column names, ...); may be empty.
    """

    def __init__(
        self,
        path: str | PathLike[str],
        reason: str,
        record: int | str | None = None,
        detail: str = "",
    ) -> None:
        """Build the error; the message is ``"{path}: {record}: {reason}[: {detail}]"``."""
        self.path = Path(path)
        self.reason = reason
        self.record = record
        self.detail = detail
        parts = [str(self.path)]
        rec = _format_record(record)
        if rec is not None:
            parts.append(rec)
        parts.append(reason)
        if detail:
            parts.append(detail)
        super().__init__(": ".join(parts))

    def __reduce__(self):  # type: ignore[override]
        # Keep the error picklable across DataLoader worker processes (the default reduce would
        # call __init__ with the single message argument).
        return (type(self), (self.path, self.reason, self.record, self.detail))


class ErrorPolicy:
    """Decide what happens to a `DataError`: raise it, or skip the record and count it.

    Attributes:
        on_error: ``"raise"`` or ``"skip"``.
        skipped: how many records were skipped, per reason code.
        examples: up to 5 messages per reason code, the first ones seen.
    """

    def __init__(self, on_error: str = "raise") -> None:
        """Create a policy; `on_error` must be one of ``"raise"`` or ``"skip"``."""
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(
                f"on_error must be one of {', '.join(repr(c) for c in ON_ERROR_CHOICES)}, "
                f"got {on_error!r}"
            )
        self.on_error = on_error
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    @property
    def raises(self) -> bool:
        """True when errors are raised rather than skipped."""
        return self.on_error == "raise"

    def handle(self, err: DataError) -> None:
        """Raise `err` in raise mode; in skip mode count it under ``err.reason`` and return."""
        if self.on_error == "raise":
            raise err
        self.skipped[err.reason] += 1
        examples = self.examples.setdefault(err.reason, [])
        if len(examples) < _EXAMPLES_PER_REASON:
            examples.append(str(err))

    def summary(self) -> dict[str, int]:
        """Skipped-record counts per reason code (empty when nothing was skipped)."""
        return dict(self.skipped)

    def __repr__(self) -> str:
        return f"ErrorPolicy(on_error={self.on_error!r}, skipped={dict(self.skipped)})"
