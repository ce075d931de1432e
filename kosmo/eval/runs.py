"""What a training run's own log, its metrics.jsonl, says about it."""

from __future__ import annotations

import json
from pathlib import Path


def metrics(run: Path) -> list[dict]:
    """Every row of the run's metrics.jsonl, one per logged step."""
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def training_throughput(run: Path) -> float:
    """The median of the tokens learned per second over the run's steps, past the first steps' warm-up."""
    rows = metrics(run)
    rates = sorted(r["tok_per_s"] for r in rows[len(rows) // 5:] if "tok_per_s" in r)
    return round(rates[len(rates) // 2], 1)
