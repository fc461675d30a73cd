"""`microswarm submit | result | cancel | map`: calls that outlive the command that made them.

    microswarm submit math.compute '{"a": 2, "b": 3}'     # prints the call's id
    microswarm result ID --wait --json                   # its envelope, from any machine of the client
    microswarm cancel ID
    microswarm map math.compute inputs.jsonl --concurrency 16 > envelopes.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Iterator

from rich.console import Console

err = Console(stderr=True)

EXIT_PENDING = 3  # `result` without --wait, on a call still running


def _client(a: argparse.Namespace) -> Any:
    from microcores.client import Client
    return Client(a.coordinator, client_name="cli", state_dir=a.state_dir, fingerprint=a.fingerprint,
                  insecure=a.insecure, client_id=a.client_id, client_secret=a.client_secret)


def _input(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(_fail(f"the input is not JSON ({exc.msg} at character {exc.pos}): {text[:80]!r}")) from None


def _fail(message: str, code: int = 1) -> int:
    from rich.markup import escape
    err.print(f"[red]error:[/] {escape(message)}")
    return code


def _print_envelope(env: Any, as_json: bool) -> int:
    if as_json:
        print(json.dumps(env.to_dict()))
    elif env.ok:
        print(json.dumps(env.result))
    else:
        e = env.error or {}
        err.print(f"[red]{e.get('code')}:[/] {e.get('message')}")
    return 0 if env.ok else 1


def guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(a: argparse.Namespace) -> int:
        from microcores.errors import MicroError
        try:
            return fn(a)
        except MicroError as exc:
            return _fail(str(exc))
        except KeyboardInterrupt:
            print("interrupted (submitted calls go on: `microswarm cancel ID` stops one)", file=sys.stderr)
            return 130
    return run


@guarded
def cmd_submit(a: argparse.Namespace) -> int:
    data = _input(a.input)
    with _client(a) as c:
        h = c.submit(a.service, data, timeout=a.timeout)
    err.print(f"[dim]submitted {a.service}: fetch it with `microswarm result {h.id} --wait`[/]")
    print(h.id)
    return 0


@guarded
def cmd_result(a: argparse.Namespace) -> int:
    with _client(a) as c:
        if a.wait:
            env = c.result(a.id, timeout=a.timeout)
        else:
            env = c._fetch(a.id, 0.0)
            if env is None:
                if a.json:
                    print(json.dumps({"call_id": a.id, "status": "pending"}))
                err.print(f"{a.id} is still running (--wait waits for it)")
                return EXIT_PENDING
    return _print_envelope(env, a.json)


@guarded
def cmd_cancel(a: argparse.Namespace) -> int:
    with _client(a) as c:
        env = c.cancel(a.id)
    if env is None:
        err.print(f"{a.id}: asked to stop; it had not stopped yet")
        return 1
    code = (env.error or {}).get("code")
    err.print(f"{a.id}: " + ("cancelled" if code == "cancelled" else f"had already finished ({env.status})"))
    if a.json:
        print(json.dumps(env.to_dict()))
    return 0


def _lines(path: str) -> Iterator[Any]:
    f = sys.stdin if path == "-" else open(path, encoding="utf-8")
    with f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SystemExit(_fail(f"{path}:{n}: not JSON ({exc.msg}); one JSON input per line")) from None


@guarded
def cmd_map(a: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    total = None
    if a.file != "-":
        try:
            with open(a.file, encoding="utf-8") as f:
                total = sum(1 for line in f if line.strip())
        except OSError as exc:
            return _fail(f"cannot read {a.file}: {exc.strerror}")
    failed = 0
    show = err.is_terminal and not a.quiet
    with _client(a) as c, Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                   TimeRemainingColumn(), console=err, disable=not show, transient=False) as bar:
        task = bar.add_task(a.service, total=total)
        for env in c.map(a.service, _lines(a.file), concurrency=a.concurrency, timeout=a.timeout, envelopes=True):
            print(json.dumps(env.to_dict()), flush=True)
            failed += not env.ok
            bar.advance(task)
    if failed:
        err.print(f"[yellow]{failed} of the calls failed[/] (their envelopes say why)")
    return 1 if failed else 0


def add_parsers(sub: Any, client_args: Callable[[argparse.ArgumentParser], None]) -> None:
    sm = sub.add_parser("submit", help="start a call and print its id (fetch it later with `result`)")
    sm.add_argument("service")
    sm.add_argument("input", nargs="?", default="{}", help="the input, JSON")
    sm.add_argument("--timeout", type=float, default=None, metavar="S", help="the call's deadline (default: "
                                                                              "the service's timeout)")
    client_args(sm)
    sm.set_defaults(func=cmd_submit)

    rs = sub.add_parser("result", help="the envelope of a submitted call, by id (exit 3 while it runs)")
    rs.add_argument("id")
    rs.add_argument("--wait", action="store_true", help="wait until the call ends")
    rs.add_argument("--timeout", type=float, default=None, metavar="S", help="with --wait: give up after S s")
    rs.add_argument("--json", action="store_true", help="print the whole envelope")
    client_args(rs)
    rs.set_defaults(func=cmd_result)

    cn = sub.add_parser("cancel", help="stop a submitted call; its job stops wherever it runs")
    cn.add_argument("id")
    cn.add_argument("--json", action="store_true", help="print the call's final envelope")
    client_args(cn)
    cn.set_defaults(func=cmd_cancel)

    mp = sub.add_parser("map", help="call a service once per line of a JSON-lines file; one envelope per line out")
    mp.add_argument("service")
    mp.add_argument("file", metavar="FILE.jsonl", help="one JSON input per line ('-': standard input)")
    mp.add_argument("--concurrency", type=int, default=16, metavar="N", help="calls in flight at once")
    mp.add_argument("--timeout", type=float, default=None, metavar="S", help="each call's deadline")
    mp.add_argument("--quiet", action="store_true", help="no progress bar")
    client_args(mp)
    mp.set_defaults(func=cmd_map)
