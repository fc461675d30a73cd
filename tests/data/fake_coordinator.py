"""A fake coordinator on the address clients were told to use: it logs whatever reaches it.

    python fake_coordinator.py --listen HOST:PORT --log FILE [--plain]

It serves TLS with a certificate of its own (bound to a key of its own, as a real coordinator's
is) or, with --plain, no TLS at all. Every RPC that gets through is logged as one JSON line
with its method and metadata (an `authorization` header would be a leaked credential), then
refused. A client that pins the real coordinator's key must leave this log empty.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from microswarm.coordinator.tls import prepare  # noqa: E402


class Catch(grpc.GenericRpcHandler):
    def __init__(self, log: Path) -> None:
        self.log = log

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        with self.log.open("a") as f:
            f.write(json.dumps({"method": details.method,
                                "metadata": {k: v if isinstance(v, str) else v.hex() for k, v in details.invocation_metadata}})
                    + "\n")

        async def refuse(request_iterator: object, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "fake coordinator")

        return grpc.stream_stream_rpc_method_handler(refuse)


async def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--plain", action="store_true")
    a = p.parse_args()
    Path(a.log).touch()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Catch(Path(a.log)),))
    if a.plain:
        port = server.add_insecure_port(a.listen)
    else:
        tls = prepare(Path(tempfile.mkdtemp(prefix="fake-coordinator-")), Ed25519PrivateKey.generate(), [a.listen])
        port = server.add_secure_port(a.listen, tls.grpc_credentials())
    if port == 0:
        print(f"cannot listen on {a.listen}", flush=True)
        return 1
    await server.start()
    print(f"fake coordinator on {a.listen} ({'plaintext' if a.plain else 'TLS, its own key'})", flush=True)
    await server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
