"""The generated modules must match protos/microswarm.proto."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_modules_are_not_stale(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)], check=True)
    for name in ("microswarm_pb2.py", "microswarm_pb2_grpc.py", "microswarm_pb2.pyi"):
        fresh = (tmp_path / name).read_text()
        committed = (ROOT / "protos" / name).read_text()
        assert fresh == committed, f"protos/{name} is stale: run `make protos` and commit the result"
