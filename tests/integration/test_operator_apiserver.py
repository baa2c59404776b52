"""The CRD and `splitserve operator` against a real API server (Kubernetes' apiextensions-apiserver on etcd), through
k8s/test-apiserver.sh, wherever its two binaries exist.

They are built from Debian unstable's Go sources (~370 MB of packages and ~5 minutes of compiling on 2 cores; the
script's header has the commands), which is too slow and too much of a moving target to do in every CI run: where
they are missing this test is skipped and says so. Point APISERVER and ETCD at them to run it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APISERVER = Path(os.environ.get("APISERVER", "/tmp/sid/apiextensions-apiserver"))
ETCD = Path(os.environ.get("ETCD", "/tmp/sid/root/usr/bin/etcd"))

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not (os.access(APISERVER, os.X_OK) and os.access(ETCD, os.X_OK)),
        reason="no apiextensions-apiserver/etcd binaries (build them as k8s/test-apiserver.sh's header says)",
    ),
]


def test_crd_schema_and_operator_on_a_real_api_server() -> None:
    env = {**os.environ, "APISERVER": str(APISERVER), "ETCD": str(ETCD)}
    done = subprocess.run(
        ["sh", "k8s/test-apiserver.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    # Each bad resource was refused by the schema, and the operator reported what it could not render.
    for name in ("bad-negative", "bad-backend", "bad-both", "bad-minmax", "bad-sources"):
        assert any(line.startswith(f"test-apiserver: rejected {name}:") for line in lines), name
    assert any("bad-machine is Degraded: spec.prefill.machineType" in line for line in lines)
    assert lines[-1] == "test-apiserver: all checks passed"
