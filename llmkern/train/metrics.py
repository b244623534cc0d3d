"""``metrics.jsonl``: one JSON object per logged step or evaluation, appended as the run goes."""
from __future__ import annotations

import json
import os
from pathlib import Path


def _step_of(line: str) -> float:
    """The ``step`` of a JSON line; infinity for a line cut short by a crash (so it is dropped)."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


class MetricsLog:
    """Appends JSON lines to ``path`` (only where ``enabled``: rank 0).

    ``resume_step``: lines of a previous run whose ``step`` is beyond the resumed step are dropped,
    so the file describes one run whatever the interruptions.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
