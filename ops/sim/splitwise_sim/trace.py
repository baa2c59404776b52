"""SplitwiseSim's trace format: what its generate_trace.py writes and its run.py reads.

    request_id,request_type,application_id,arrival_timestamp,batch_size,prompt_size,token_size

arrival_timestamp is seconds from the start of the simulation (not shifted: SplitwiseSim starts its clock at 0 and
its first request arrives later); prompt_size and token_size are the prompt and output tokens.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ops.bench.workload import TraceRequest

__all__ = ["COLUMNS", "is_splitwise_sim_trace", "load_splitwise_sim_trace"]

COLUMNS = ("arrival_timestamp", "prompt_size", "token_size")


def is_splitwise_sim_trace(path: Path) -> bool:
    """Whether the CSV's header is SplitwiseSim's (else it is taken for an Azure trace)."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), None) or []
    return all(column in [name.strip() for name in header] for column in COLUMNS)


def load_splitwise_sim_trace(
    path: Path, *, time_scale: float = 1.0, limit: int | None = None, start: int = 0
) -> list[TraceRequest]:
    """Rows start .. start + limit - 1, arrivals divided by time_scale; ValueError naming the line of a bad row."""
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise ValueError(f"time_scale must be a finite number > 0, not {time_scale}")
    requests: list[TraceRequest] = []
    with Path(path).open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        for index, row in enumerate(reader):
            if index < start:
                continue
            if limit is not None and len(requests) >= limit:
                break
            where = f"{path}: line {reader.line_num}"
            try:
                arrival = float(row["arrival_timestamp"]) / time_scale
                prompt, output = int(row["prompt_size"]), int(row["token_size"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}: {exc}") from None
            if not math.isfinite(arrival) or prompt < 1 or output < 1:
                raise ValueError(f"{where}: arrival must be finite and prompt_size, token_size >= 1")
            if requests and arrival < requests[-1].arrival_s:
                raise ValueError(
                    f"{where}: arrival_timestamp goes back in time; the trace must be sorted by time"
                )
            requests.append(TraceRequest(arrival_s=arrival, prompt_tokens=prompt, output_tokens=output))
    return requests
