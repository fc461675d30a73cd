"""A lying volunteer for the verification tests: the real agent (agent.daemon), whose results are
rewritten on their way out.

    python lying_agent.py [--lie-after N] [--lie-every K] [--lie-log PATH] [--forge] [--short-output]
                          -- <the arguments of `microswarm agent start`>

It joins, installs and runs jobs like any agent; of its successful results, after the first
`--lie-after` (default 0), every `--lie-every`-th (default 1) has each number in its output
replaced by 1337 (with `--forge`: the output is replaced by bytes that are not the service's
model at all). Each lie is appended to `--lie-log` as `<job_id>`. With `--short-output`, an output
sent ahead in pieces lacks its last piece (and its result still says it is whole).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from microswarm.agent import daemon  # noqa: E402
from microcores import _codec  # noqa: E402
from microswarm import cli  # noqa: E402
from microswarm.protos import microswarm_pb2 as pb  # noqa: E402


def lie(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return 1337
    if isinstance(value, dict):
        return {k: lie(v) for k, v in value.items()}
    if isinstance(value, list):
        return [lie(v) for v in value]
    return value


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--lie-after", type=int, default=0)
    p.add_argument("--lie-every", type=int, default=1)
    p.add_argument("--lie-log", default="")
    p.add_argument("--forge", action="store_true")
    p.add_argument("--short-output", action="store_true",
                   help="drop the last piece of every output sent ahead in pieces (JobOutput)")
    a, rest = p.parse_known_args()
    rest = [r for r in rest if r != "--"]
    seen = 0
    pieces_sent: dict[str, int] = {}
    send = daemon.Link.send

    def lying_send(self: daemon.Link, msg: pb.ToCoordinator) -> None:
        nonlocal seen
        if a.short_output and msg.WhichOneof("kind") == "output":
            sent = pieces_sent.get(msg.output.job_id, 0) + len(msg.output.data)
            pieces_sent[msg.output.job_id] = sent
            if sent >= msg.output.size:
                return  # the last piece never goes: the output does not add up to what it announced
        if msg.WhichOneof("kind") == "result" and msg.result.ok and not a.short_output:
            seen += 1
            if seen > a.lie_after and (seen - a.lie_after) % a.lie_every == 0:
                r = msg.result
                r.output = b"\xc1not msgpack" if a.forge else _codec.pack(lie(_codec.unpack(r.output)))
                if a.lie_log:
                    fd = os.open(a.lie_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    try:
                        os.write(fd, f"{r.job_id}\n".encode())
                    finally:
                        os.close(fd)
        send(self, msg)

    daemon.Link.send = lying_send  # type: ignore[method-assign]
    return cli.main(["agent", "start", *rest])


if __name__ == "__main__":
    sys.exit(main())
