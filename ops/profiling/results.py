"""A profile's measured trials and the perf-model CSV they are written to.

The columns and units are those of the Splitwise simulator's perf_model.csv, which cluster.perfmodel reads: times in
milliseconds, e2e_time = prompt_time + (token_size - 1) * token_time, one row per trial. Power is not measured on
this path, so both power columns are 0, as on the published H100 rows.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cluster.perfmodel import PERF_CSV_COLUMNS
from engine.errors import InvalidRequestError
from ops.profiling.sweep import ProfilePoint

# One engine process serves the model on this machine: no tensor parallelism.
TENSOR_PARALLEL = 1


@dataclass(frozen=True, slots=True)
class Trial:
    point: ProfilePoint
    prompt_time_s: float  # the one prefill step of the whole batch
    token_time_s: float  # median of the batch's decode steps

    @property
    def e2e_time_s(self) -> float:
        return self.prompt_time_s + (self.point.token_size - 1) * self.token_time_s


def write_perf_csv(path: Path, model: str, hardware: str, trials: Iterable[Trial]) -> int:
    """Write the trials as perf_model.csv rows (replacing the file); returns the number of rows."""
    rows = [_row(model, hardware, trial) for trial in trials]
    try:
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(PERF_CSV_COLUMNS)
            writer.writerows(rows)
    except OSError as exc:
        raise InvalidRequestError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return len(rows)


def _row(model: str, hardware: str, trial: Trial) -> list[object]:
    point = trial.point
    return [
        model,
        hardware,
        point.prompt_size,
        point.batch_size,
        point.token_size,
        0.0,  # peak_power: not measured
        0.0,  # average_power: not measured
        trial.prompt_time_s * 1000.0,
        trial.token_time_s * 1000.0,
        trial.e2e_time_s * 1000.0,
        TENSOR_PARALLEL,
    ]
