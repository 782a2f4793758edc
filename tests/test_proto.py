"""The committed Python stubs are what `make proto` generates from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", "proto/baton/v1/baton.proto"],
        cwd=ROOT, check=True,
    )
    for name in ("baton_pb2.py", "baton_pb2.pyi", "baton_pb2_grpc.py"):
        fresh = (tmp_path / "baton" / "v1" / name).read_text()
        assert (ROOT / "baton" / "v1" / name).read_text() == fresh, f"baton/v1/{name} is stale: run `make proto`"
