"""`microswarm routes apply FILE | list [--json] | remove NAME`: existing web services behind the gateway.

    microswarm routes apply routes.toml      # checks every route first; applies all of them, or none
    microswarm routes list                   # name, method, url, input, timeout, pure, headers (names only)
    microswarm routes remove pegawai.data

The file is checked here (so a mistake is named with its file before anything is sent) and again by
the coordinator, which also refuses a name a published service has. Every command is the operator's:
it sends the admin credential of the coordinator's state directory, like `publish`.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

out = Console()
err = Console(stderr=True)


def _fail(message: str) -> int:
    err.print(f"[red]error:[/] {escape(message)}")
    return 1


def _rpc(a: argparse.Namespace, method: str, request: Any) -> Any:
    """One Routes RPC with the admin credential; SystemExit with a clear message on any refusal."""
    import grpc

    from microcores.errors import MicroError
    from microswarm.cli import _admin_stub
    from microswarm.protos import microswarm_pb2_grpc as pbg

    try:
        channel, _, md = _admin_stub(a)
    except (PermissionError, MicroError) as exc:
        raise SystemExit(_fail(str(exc))) from None
    with channel:
        try:
            return getattr(pbg.RoutesStub(channel), method)(request, metadata=md, timeout=15)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                from microcores import _tls
                if _tls.handshake_failed(exc.details() or ""):
                    from microcores.client import _unavailable
                    raise SystemExit(_fail(_unavailable(exc, a.coordinator).message)) from None
                raise SystemExit(_fail(f"cannot reach the coordinator at {a.coordinator}: is it running? (routes "
                                       "are applied to the running coordinator; set --coordinator or "
                                       "MICROSWARM_COORDINATOR)")) from None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                raise SystemExit(_fail("this coordinator has no routes: it is older than this client")) from None
            raise SystemExit(_fail(exc.details() or str(code))) from None


def cmd_apply(a: argparse.Namespace) -> int:
    from microswarm.coordinator.routes import RouteError, parse_file
    from microswarm.protos import microswarm_pb2 as pb

    try:
        routes = parse_file(a.file)
    except RouteError as exc:
        return _fail(exc.message)
    r = _rpc(a, "Apply", pb.ApplyRoutesRequest(routes=[x.to_spec() for x in routes], prune=a.prune))
    done = {"added": list(r.added), "changed": list(r.changed), "unchanged": list(r.unchanged),
            "removed": list(r.removed)}
    if a.json:
        print(json.dumps(done))
        return 0
    for what, names in done.items():
        if names:
            out.print(f"{what}: {', '.join(names)}")
    return 0


def row(info: Any) -> dict[str, Any]:
    """A route as listings show it: header names, each value `***`."""
    return {"name": info.name, "method": info.method, "url": info.url, "input": info.input,
            "timeout_s": info.timeout_s, "pure": info.pure, "headers": {h: "***" for h in info.header_names},
            "schema": json.loads(info.schema_json or "{}"), "description": info.description,
            "cache_ttl_s": info.cache_ttl_s or None, "max_response_bytes": info.max_response_bytes,
            "revision": info.revision, "digest": info.digest, "applied_at": info.applied_at}


def cmd_list(a: argparse.Namespace) -> int:
    from microswarm.protos import microswarm_pb2 as pb

    r = _rpc(a, "List", pb.ListRoutesRequest())
    rows = [row(i) for i in r.routes]
    if a.json:
        print(json.dumps(rows))
        return 0
    t = Table(title=f"routes ({len(rows)})", title_justify="left")
    t.add_column("name", no_wrap=True)
    t.add_column("method", no_wrap=True)
    t.add_column("url", overflow="fold")  # whole, folded: a cut URL is a wrong one
    for col in ("input", "timeout", "pure"):
        t.add_column(col, no_wrap=True)
    t.add_column("headers", overflow="fold")
    t.add_column("rev")  # applied_at, digest, schema: --json
    for x in rows:
        t.add_row(x["name"], x["method"], escape(x["url"]), x["input"], f"{x['timeout_s']:g} s",
                  "yes" if x["pure"] else "", escape(", ".join(f"{h}: ***" for h in x["headers"])) or "-",
                  str(x["revision"]))
    out.print(t)
    return 0


def cmd_remove(a: argparse.Namespace) -> int:
    from microswarm.protos import microswarm_pb2 as pb

    r = _rpc(a, "Remove", pb.RemoveRouteRequest(name=a.name))
    out.print(f"route {r.route.name} removed")
    return 0


def add_parsers(sub: Any, client_args: Callable[[argparse.ArgumentParser], None]) -> None:
    ro = sub.add_parser("routes", help="existing web services behind the gateway: apply, list, remove")
    rosub = ro.add_subparsers(dest="action", required=True)
    ap = rosub.add_parser("apply", help="add or replace the routes of a TOML file (all of them, or none)")
    ap.add_argument("file", metavar="FILE", help="a TOML file of [[route]] tables (see docs/gateway.md)")
    ap.add_argument("--prune", action="store_true", help="also remove the routes the file does not declare")
    ap.add_argument("--json", action="store_true", help="one JSON object: added, changed, unchanged, removed")
    client_args(ap)
    ap.set_defaults(func=cmd_apply)
    li = rosub.add_parser("list", help="the routes (header names only: their values are secrets)")
    li.add_argument("--json", action="store_true", help="one JSON array instead of the table")
    client_args(li)
    li.set_defaults(func=cmd_list)
    rm = rosub.add_parser("remove", help="remove a route: its service stops at once")
    rm.add_argument("name", metavar="NAME", help="the route's name, group.function")
    client_args(rm)
    rm.set_defaults(func=cmd_remove)
