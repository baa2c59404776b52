"""The committed protobuf/gRPC modules are exactly what the .proto sources generate (run `make proto` if not)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def test_generated_modules_match_the_proto_sources(tmp_path: Path) -> None:
    sources = sorted((PROTO_ROOT / "splitserve" / "v1").glob("*.proto"))
    shutil.copytree(
        PROTO_ROOT / "splitserve", tmp_path / "splitserve", ignore=shutil.ignore_patterns("*.py*")
    )
    args = [
        f"-I{tmp_path}",
        f"--python_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
    ]
    # In a subprocess: grpc_tools' compiler segfaults when loaded into a process that already imported nixl
    # (their bundled native libraries collide), and the test session imports nixl for the transport tests.
    files = [str(tmp_path / "splitserve/v1" / s.name) for s in sources]
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", *args, *files], capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr.decode()
    for source in sources:
        for suffix in GENERATED_SUFFIXES:
            name = source.stem + suffix
            committed = (PROTO_ROOT / "splitserve/v1" / name).read_text()
            assert committed == (tmp_path / "splitserve/v1" / name).read_text(), (
                f"{name} is stale: run `make proto`"
            )
