"""The C++ kernels' build lock: a lock left by a killed build is removed, a live build is waited for."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from engine.kernels.cpu_native import wait_for_build_lock


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path: Path) -> None:
    (tmp_path / "lock").touch()
    (tmp_path / "half_built.o").touch()
    for path in tmp_path.iterdir():
        _age(path, 600)
    started = time.monotonic()
    wait_for_build_lock(tmp_path, stale_s=300, poll_s=0.01)
    assert not (tmp_path / "lock").exists()
    assert time.monotonic() - started < 5  # no wait for a dead build
    assert (tmp_path / "half_built.o").exists()  # only the lock goes


def test_a_live_build_is_waited_for_and_its_lock_left_alone(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    _age(lock, 600)  # an old lock, but the build is writing files: it is alive
    (tmp_path / "part0.o").touch()
    removed_by_builder = threading.Event()

    def builder() -> None:
        for i in range(1, 6):
            (tmp_path / f"part{i}.o").touch()
            time.sleep(0.05)
        lock.unlink()
        removed_by_builder.set()

    thread = threading.Thread(target=builder)
    thread.start()
    try:
        wait_for_build_lock(tmp_path, stale_s=2.0, poll_s=0.01)
    finally:
        thread.join(timeout=10)
    assert removed_by_builder.is_set()  # we returned because the builder finished, not because we removed it


def test_no_lock_returns_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    wait_for_build_lock(tmp_path, stale_s=300, poll_s=1.0)
    assert time.monotonic() - started < 0.5
