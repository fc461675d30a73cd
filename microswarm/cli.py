"""`microswarm`: one console script for operators, volunteers and clients."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from microswarm.render import Parser, cache_summary, console, env_help, fill_help

err = console(stderr=True)
out = console()  # the terminal's width, or 200 columns when not a terminal (no 80-column cut)


def _state_default() -> str:
    from microswarm.coordinator.state import default_state_dir
    return str(default_state_dir())


def _coordinator_default() -> str:
    from microcores.client import default_coordinator
    return default_coordinator()


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="coordinator address (env MICROSWARM_COORDINATOR, default 127.0.0.1:7070)")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="coordinator state directory (env MICROSWARM_STATE_DIR, default ~/.local/state/microswarm); "
                        "its coordinator.crt pins the coordinator's key")
    p.add_argument("--fingerprint", default=None, metavar="HEX",
                   help="the coordinator's key fingerprint, as `coordinator start` prints it (env "
                        "MICROSWARM_FINGERPRINT): pins its key where the state directory is not readable")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="plaintext, for a coordinator started with --insecure (env MICROSWARM_INSECURE=1)")
    p.add_argument("--client-id", default=None, metavar="ID",
                   help="call as this client (env MICROSWARM_CLIENT_ID; default: the operator, from the state dir)")
    p.add_argument("--client-secret", default=None, metavar="SECRET",
                   help="its secret (env MICROSWARM_CLIENT_SECRET; the variable keeps it out of `ps`)")


def _pin(a: argparse.Namespace) -> dict[str, Any]:
    """How a client command pins the coordinator's key (microcores._tls)."""
    return {"state_dir": a.state_dir, "fingerprint": a.fingerprint, "insecure": a.insecure}


def _client_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """A client command's Client: its pin, and --client-id/--client-secret when given."""
    kw = _pin(a)
    if getattr(a, "client_id", None):
        kw.update(client_id=a.client_id, client_secret=a.client_secret)
    return kw


def _setup_logging(level: str, fmt: str = "text") -> None:
    if fmt == "json":
        from microswarm.logs import setup_json_logging
        setup_json_logging(level)
    else:
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


# ---------------------------------------------------------------- coordinator

def cmd_coordinator_start(a: argparse.Namespace) -> int:
    from microswarm.coordinator.server import Coordinator, CoordinatorConfig

    _setup_logging(a.log_level, a.log_format)
    cfg = CoordinatorConfig(listen=a.listen, state_dir=a.state_dir or _state_default(), dispatch=a.dispatch,
                            heartbeat_s=a.heartbeat, liveness_s=a.liveness, fallback_slots=a.fallback_slots,
                            drain_s=a.drain, cache=not a.no_cache, http=a.http or "", token_ttl_s=a.token_ttl,
                            metrics_auth=a.metrics_auth, placement=a.placement, local_slots=a.local_slots,
                            queue_wait_s=a.queue_wait, queue_limit=a.queue_limit, max_attempts=a.max_attempts,
                            quarantine_s=a.quarantine, hedge=a.hedge, worker_idle_s=a.worker_idle,
                            verify=a.verify, trust_after=a.trust_after, spot_check=a.spot_check,
                            insecure=a.insecure, tls_cert=a.tls_cert, tls_key=a.tls_key,
                            result_ttl_s=a.result_ttl, handshake_rate=a.handshake_rate,
                            heartbeat_budget=a.heartbeat_budget, state_url=a.state_url or "")
    cfg.advertise = a.advertise
    cfg.cache_url, cfg.cache_write = a.cache_url or "", a.cache_write
    cfg.cache_write_queue, cfg.cache_write_batch = a.cache_write_queue, a.cache_write_batch
    cfg.cache_write_interval_s = a.cache_write_interval
    cfg.peer_address, cfg.forward = a.peer_address or "", a.forward
    try:
        from microcores import _publisher
        paths = [a.publisher_key] if isinstance(a.publisher_key, str) else (a.publisher_key or [])  # toml: one
        cfg.publisher_keys = [_publisher.load_public(p) for p in paths]
    except (OSError, ValueError) as exc:
        err.print(f"[red]error:[/] --publisher-key: {exc}")
        return 2
    try:
        from microswarm.coordinator.governor import GovernorSettings
        cfg.governor = GovernorSettings.from_options(a.max_heap, a.eviction_threshold, a.soft_target,
                                                     a.critical_threshold)
    except ImportError:
        pass
    except ValueError as exc:
        err.print(f"[red]error:[/] {exc}")
        return 2
    try:
        asyncio.run(Coordinator(cfg).run_forever())
    except (OSError, ValueError) as exc:
        err.print(f"[red]error:[/] {exc}")
        return 1
    return 0


def cmd_coordinator_token(a: argparse.Namespace) -> int:
    state = _token_state(a)
    if a.name is None:
        if a.max_agents is not None or a.max_slots is not None:
            return _fail("--max-agents and --max-slots are caps of a volunteer's own token: give --name too")
        token = state.token(new=a.new)
        err.print(f"join token for coordinator {state.fingerprint.hex()[:16]} "
                  f"(keep it secret; agents join with --token):")
        print(token)
        return 0
    if a.new:
        return _fail("--new makes another shared token; a named one is made by its first `token --name` "
                     "(revoke it with `microswarm coordinator tokens revoke NAME` to replace it)")
    try:
        token, tok, what = state.volunteer_token(a.name, a.max_agents, a.max_slots)
    except ValueError as exc:
        return _fail(str(exc))
    caps = ", ".join(f"{v} {unit}" for v, unit in ((tok.max_agents, "agent(s)"), (tok.max_slots, "slot(s)")) if v)
    said = {"minted": "new", "unchanged": "existing", "updated": "existing (caps updated)"}[what]
    err.print(f"{said} join token [bold]{tok.name}[/] for coordinator {state.fingerprint.hex()[:16]}, "
              f"{'at most ' + caps if caps else 'no caps'} (keep it secret; the volunteer's agents join with "
              f"--token; a running coordinator picks it up within a second):")
    print(token)
    return 0


def _token_state(a: argparse.Namespace) -> Any:
    """The coordinator's state for the token commands: its files, or its database (--state-url, or
    the URL the coordinator of this state directory runs with)."""
    from microswarm.coordinator.store import open_state, state_url_for

    state_dir = a.state_dir or _state_default()
    try:
        return open_state(state_dir, state_url_for(state_dir, getattr(a, "state_url", None)))
    except ValueError as exc:  # the database cannot be reached, or the URL is not one
        raise SystemExit(_fail(str(exc))) from None


def cmd_coordinator_tokens_list(a: argparse.Namespace) -> int:
    from microswarm.coordinator.volunteers import KEYS_FILE, KeyBindings

    state = _token_state(a)
    try:
        tokens = state.join_tokens()
        bound: KeyBindings
        if hasattr(state, "db"):
            from microswarm.coordinator.pgvolunteers import PgKeyBindings
            bound = PgKeyBindings(state.db)
        else:
            bound = KeyBindings(state.path / KEYS_FILE)
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    rows = [{**t.describe(), "agent_ids": bound.count(t.name)} for t in tokens if t.name]
    if a.json:
        print(json.dumps(rows))
        return 0
    shared = sum(1 for t in tokens if not t.name)
    t = Table(title=f"volunteer tokens ({len(rows)}; and {shared} shared join secret(s))", title_justify="left")
    for col in ("name", "max agents", "max slots", "agent ids bound", "created", "state"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], str(r["max_agents"] or "-"), str(r["max_slots"] or "-"), str(r["agent_ids"]),
                  datetime.fromtimestamp(r["created"]).strftime("%Y-%m-%d %H:%M") if r["created"] else "-",
                  "[red]revoked[/]" if r["revoked"] else "active")
    out.print(t)
    return 0


def cmd_coordinator_tokens_revoke(a: argparse.Namespace) -> int:
    state = _token_state(a)
    try:
        tok, now = state.revoke_token(a.name)
    except (KeyError, ValueError) as exc:
        return _fail(exc.args[0] if exc.args else str(exc))
    if not now:
        out.print(f"token {tok.name} was already revoked")
        return 0
    out.print(f"token {tok.name} revoked: a running coordinator disconnects its agents within a second and "
              "refuses them from now on")
    return 0


# ---------------------------------------------------------------- agent

def cmd_agent_start(a: argparse.Namespace) -> int:
    from microswarm.agent.daemon import Agent, AgentConfig

    _setup_logging(a.log_level, a.log_format)
    token = a.token or os.environ.get("MICROSWARM_TOKEN", "")
    if not token:
        err.print("[red]error:[/] no join token: pass --token or set MICROSWARM_TOKEN "
                  "(get one with `microswarm coordinator token` on the coordinator)")
        return 2
    from microswarm.agent.volunteer import VolunteerSettings, parse_size
    try:
        vol = VolunteerSettings(max_cpu=float(a.max_cpu or 0), max_memory=parse_size(a.max_memory or 0),
                                max_job_cpu=int(a.max_job_cpu or 0), idle_only=bool(a.idle_only),
                                idle_threshold=float(a.idle_threshold), idle_wait=float(a.idle_wait))
    except ValueError as exc:
        err.print(f"[red]error:[/] {exc}")
        return 2
    if a.discover and a.coordinator_given:
        err.print("[red]error:[/] give either --coordinator or --discover, not both")
        return 2
    cfg = AgentConfig(coordinator=a.coordinator or _coordinator_default(), token=token, slots=a.slots,
                      agent_id=a.id or "", state_dir=a.state_dir or _state_default(), drain_s=a.drain,
                      discover=bool(a.discover), discover_timeout_s=float(a.discover_timeout), volunteer=vol,
                      max_packages=a.max_packages, worker_idle_s=a.worker_idle,
                      require_sandbox=bool(a.require_sandbox), insecure=a.insecure)
    try:
        agent = Agent(cfg)
    except ValueError as exc:
        err.print(f"[red]error:[/] {exc}")
        return 2
    return asyncio.run(agent.run())


def cmd_agent_control(a: argparse.Namespace) -> int:
    """pause / resume / status of the agent running on this machine with this state directory."""
    from microswarm.agent.volunteer import control

    state_dir = a.state_dir or _state_default()
    args = {"finish": True} if getattr(a, "finish", False) else {}
    try:
        reply = control(state_dir, a.action, **args)
    except (ConnectionError, OSError, ValueError) as exc:
        err.print(f"[red]error:[/] {exc}")
        return 1
    if not reply.get("ok"):
        err.print(f"[red]error:[/] {reply.get('error')}")
        return 1
    if a.action == "status" or getattr(a, "json", False):
        print(json.dumps(reply, indent=None if getattr(a, "json", False) else 1))
    elif a.action == "pause":
        handed = reply.get("handed_back", 0)
        out.print(f"agent paused: it takes no new jobs{f'; {handed} running job(s) handed back' if handed else ''}")
    else:
        out.print(f"agent resumed (mode: {reply.get('mode')})")
    return 0


# ---------------------------------------------------------------- client commands

def cmd_publish(a: argparse.Namespace) -> int:
    from microcores.client import publish
    from microcores.errors import MicroError

    try:
        replies = publish(a.path, coordinator=a.coordinator, sign_with=a.sign_with, **_pin(a))
    except (MicroError, PermissionError, ValueError, FileNotFoundError, ImportError, SyntaxError) as exc:
        err.print(f"[red]error:[/] {exc}")
        return 1
    for r in replies:
        what = "unchanged" if r.unchanged else f"revision {r.revision}"
        out.print(f"published [bold]{r.name}[/]@{r.version} ({what}, digest {r.digest[:12]})")
    if a.wait > 0:
        return _wait_rollout(a, {r.name: r.digest for r in replies})
    return 0


def cmd_keys_create(a: argparse.Namespace) -> int:
    from microcores import _publisher
    from microcores._secure import fingerprint

    try:
        pub_path, pub = _publisher.create(Path(a.path))
    except (OSError, ValueError) as exc:  # FileExistsError among them: never overwrite a key
        return _fail(str(exc))
    err.print(f"publisher key created: private key {a.path} (keep it off the coordinator, ideally offline), "
              f"public key {pub_path} (for `coordinator start --publisher-key`); fingerprint:")
    print(fingerprint(pub).hex())  # errors and logs name a key by the first 16 digits
    return 0


def _wait_rollout(a: argparse.Namespace, digests: dict[str, str]) -> int:
    """Show the new versions reaching the connected agents; calls go to agents once they hold them."""
    from rich.progress import Progress

    from microcores.client import Client
    from microcores.errors import MicroError

    deadline = time.monotonic() + a.wait
    with Client(a.coordinator, **_client_kwargs(a)) as c, Progress(console=err, transient=True) as progress:
        task = progress.add_task("rolling out to agents", total=None)
        while True:
            try:
                st = c.status(recent_calls=0)
            except MicroError as exc:
                err.print(f"[yellow]warning:[/] could not follow the rollout: {exc.message}")
                return 0
            ready = [ag for ag in st.agents if ag.state != "suspect"  # placement may give it to only some
                     and (st.placement == "all" or set(digests) & set(ag.packages))]
            labels = {f"{s.name}@{s.version}" for s in st.services if digests.get(s.name) == s.digest}
            done = sum(1 for ag in ready if labels <= set(ag.versions))
            progress.update(task, total=max(1, len(ready)), completed=done)
            if done >= len(ready):
                break
            if time.monotonic() > deadline:
                err.print(f"[yellow]rollout not finished after {a.wait:g} s: {done}/{len(ready)} agents hold "
                          "the new version; calls run on the coordinator until they do[/]")
                return 0
            time.sleep(0.2)
    out.print(f"rolled out to {done} agent{'s' if done != 1 else ''}")
    return 0


def cmd_call(a: argparse.Namespace) -> int:
    """One call. Ctrl-C cancels it (the RPC, hence its job) and exits 130 with one line, `cancelled`.

    The call runs on a thread of its own and the main thread only waits for it, so Ctrl-C's
    KeyboardInterrupt never lands inside gRPC's code (half-way through starting the call, it can
    leave the channel's close waiting forever); the main thread then closes the channel, which
    cancels the RPC, and the coordinator stops the job.
    """
    import signal
    import threading

    interrupted = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupted
        if not interrupted:  # the first Ctrl-C stops the call; more while it winds down are ignored
            interrupted = True
            raise KeyboardInterrupt

    previous: Any = None
    client: Any = None
    worker: threading.Thread | None = None
    bar: Any = None  # on a terminal: the call is submitted and its progress drawn (callbar.py)
    try:
        try:
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # (started with Ctrl-C ignored: kept so)
                previous = signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread: Python's own KeyboardInterrupt, caught below all the same
            pass
        from microcores.client import Client
        from microcores.errors import MicroError
        from microswarm.protos import microswarm_pb2 as pb

        done = threading.Event()
        outcome: dict[str, Any] = {}
        if err.is_terminal:
            from microswarm.callbar import CallBar
            bar = CallBar(err)

        def call() -> None:
            nonlocal client
            try:
                if interrupted:
                    return
                with Client(a.coordinator, client_name=f"cli:{os.environ.get('USER', 'user')}",
                            **_client_kwargs(a)) as client:
                    if bar is not None:
                        outcome["env"] = bar.run(client, a.service, a.input.encode(), a.timeout, pb.JSON)
                    else:
                        outcome["env"] = client.envelope(a.service, a.input.encode(), timeout=a.timeout,
                                                         encoding=pb.JSON)
            except BaseException as exc:  # handed to the main thread as it is
                outcome["exc"] = exc
            finally:
                done.set()

        worker = threading.Thread(target=call, name="microswarm-call", daemon=True)
        worker.start()
        done.wait()
        exc = outcome.get("exc")
        if isinstance(exc, MicroError):
            if a.json:
                print(json.dumps({"status": "error", "error": exc.to_dict(), "executed_by": "", "attempts": 0,
                                  "process_time_ms": 0.0, "cache_hit": False, "verified": False}))
            err.print(f"[red]error:[/] {exc.message}")
            if exc.details:  # a service_error's traceback, within its package
                print(exc.details, file=sys.stderr)
            return 3
        if exc is not None:
            raise exc
        env = outcome["env"]
        if a.json:
            print(json.dumps(env.to_dict()))
        elif env.ok:
            print(json.dumps(env.result))
            err.print(f"[dim]{env.service}@{env.version} by {env.executed_by} in {env.process_time_ms:.1f} ms"
                      f"{' (cache)' if env.cache_hit else ''}{', verified' if env.verified else ''}[/]")
        else:
            e = env.error or {}
            err.print(f"[red]{e.get('code')}:[/] {e.get('message')}")
            if e.get("details"):  # a service_error's traceback, within its package
                print(e["details"], file=sys.stderr)
        return 0 if env.ok else 1
    except KeyboardInterrupt:
        interrupted = True  # (keeps on_sigint in place, ignoring any further Ctrl-C, until the exit)
        print("cancelled", file=sys.stderr, flush=True)
        if bar is not None:
            bar.cancel()  # a submitted call: the Cancel RPC stops it
        if client is not None:
            client.close()  # cancels the RPC in flight: the coordinator stops the job
        if worker is not None:
            worker.join(2)
        return 130
    finally:
        if previous is not None and not interrupted:
            signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- gateway clients

def _admin_stub(a: argparse.Namespace) -> tuple[Any, Any, list[tuple[str, str]]]:

    from microcores import _tls
    from microcores.client import CHANNEL_OPTIONS, admin_credential, default_coordinator
    from microswarm.protos import microswarm_pb2_grpc as pbg

    md = [("authorization", f"Admin {admin_credential(a.state_dir)}")]
    target = a.coordinator or default_coordinator()
    channel = _tls.resolve(target, **_pin(a)).channel(target, CHANNEL_OPTIONS)
    return channel, pbg.CoordinatorStub(channel), md


def _admin_rpc(a: argparse.Namespace, method: str, request: Any) -> Any:
    """An operator RPC on the running coordinator, with the admin credential of its state dir."""
    import grpc

    from microcores.errors import MicroError

    try:
        channel, stub, md = _admin_stub(a)
    except (PermissionError, MicroError) as exc:
        raise SystemExit(_fail(str(exc))) from None
    with channel:
        try:
            return getattr(stub, method)(request, metadata=md, timeout=15)
        except grpc.RpcError as exc:
            from microcores import _tls
            if exc.code() == grpc.StatusCode.UNAVAILABLE and _tls.handshake_failed(exc.details() or ""):
                from microcores.client import _unavailable
                raise SystemExit(_fail(_unavailable(exc, a.coordinator).message)) from None
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise SystemExit(_fail(f"cannot reach the coordinator at {a.coordinator}: is it running? "
                                       "(clients are managed by the running coordinator; set --coordinator "
                                       "or MICROSWARM_COORDINATOR)")) from None
            raise SystemExit(_fail(exc.details() or str(exc.code()))) from None


def _fail(message: str) -> int:
    err.print(f"[red]error:[/] {message}")
    return 1


def _client_row(ci: Any) -> dict[str, Any]:
    return {"client_id": ci.client_id, "name": ci.name, "scopes": list(ci.scopes), "created": ci.created,
            "revoked": ci.revoked or None}


def cmd_clients_create(a: argparse.Namespace) -> int:
    from microswarm.protos import microswarm_pb2 as pb

    r = _admin_rpc(a, "CreateClient", pb.CreateClientRequest(name=a.name, scopes=a.scope or []))
    if a.json:
        print(json.dumps({**_client_row(r.client), "client_secret": r.client_secret}))
        return 0
    err.print(f"client [bold]{r.client.name}[/] created, scopes {' '.join(r.client.scopes)}. "
              "The secret is shown this once: keep it safe.")
    print(f"client_id:     {r.client.client_id}")
    print(f"client_secret: {r.client_secret}")
    return 0


def cmd_clients_list(a: argparse.Namespace) -> int:
    from microswarm.protos import microswarm_pb2 as pb

    r = _admin_rpc(a, "ListClients", pb.ListClientsRequest())
    rows = [_client_row(c) for c in r.clients if a.all or not c.revoked]
    if a.json:
        print(json.dumps(rows))
        return 0
    t = Table(title=f"clients ({len(rows)})", title_justify="left")
    for col in ("client id", "name", "scopes", "created", "state"):
        t.add_column(col)
    for c in rows:
        t.add_row(c["client_id"], c["name"], " ".join(c["scopes"]),
                  datetime.fromtimestamp(c["created"]).strftime("%Y-%m-%d %H:%M"),
                  "[red]revoked[/]" if c["revoked"] else "active")
    out.print(t)
    return 0


def cmd_clients_revoke(a: argparse.Namespace) -> int:
    from microswarm.protos import microswarm_pb2 as pb

    r = _admin_rpc(a, "RevokeClient", pb.RevokeClientRequest(client=a.client))
    out.print(f"client {r.client.client_id} ({r.client.name}) revoked: its tokens stopped working")
    return 0


AGENT_ROWS = 50  # agents in `status`'s table (the first by id); --json has them all


def status_dict(reply: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    d = MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    d.pop("cache_json", None)
    d["cache"] = json.loads(reply.cache_json) if reply.cache_json else {}
    return d


def status_tables(reply: Any, max_calls: int | None = None) -> list[Table]:
    """`status`'s tables: agents, scheduler, services, recent calls (the max_calls most recent, when
    given), and the result cache in a few figures (`cache stats` has them all)."""
    total = max(reply.agents_total, len(reply.agents))
    shown = f"{len(reply.agents)} of {total:,}; `status --json` lists all" if total > len(reply.agents) else str(total)
    t = Table(title=f"agents ({shown})", title_justify="left")
    for col in ("id", "address", "state", "trust", "sandbox", "packages", "slots", "load", "last heartbeat", "done",
                "failed"):
        t.add_column(col)
    for ag in reply.agents:
        state = ag.state + (f" ({ag.mode})" if ag.mode and ag.mode != "active" else "")
        if ag.state == "quarantined":
            state = f"[red]quarantined[/] ({ag.quarantine_left_s:.0f} s left)"
        pkgs = ", ".join(ag.packages) if len(ag.packages) <= 3 else f"{len(ag.packages)} packages"
        trust = {"trusted": "[green]trusted[/]", "quarantined": "[red]quarantined[/]"}.get(ag.trust, ag.trust or "-")
        if ag.agreements or ag.disagreements:
            trust += f" ({ag.agreements}/{ag.disagreements})"
        sandbox = ag.sandbox if ag.sandbox in ("bwrap", "") else f"[red]{ag.sandbox}[/]"
        t.add_row(ag.agent_id, ag.address, state, trust, sandbox or "-", pkgs or "-", str(ag.slots),
                  f"{ag.running}/{ag.slots}", f"{ag.last_heartbeat_s:.1f} s ago", str(ag.jobs_done),
                  str(ag.jobs_failed))
    routes = " and routes" if reply.routes else ""
    s = Table(title=f"services{routes} ({len(reply.services) + len(reply.routes)})", title_justify="left")
    for col in ("service", "version", "rev", "pure", "idempotent", "timeout", "agents", "digest"):
        s.add_column(col)
    rows = [(sv, str(sv.agents)) for sv in reply.services] + [(r, "upstream") for r in reply.routes]
    for sv, agents in rows:  # a route's "agents": its source, which the coordinator asks
        s.add_row(sv.name, sv.version, str(sv.revision), "yes" if sv.pure else "", "yes" if sv.idempotent else "",
                  f"{sv.timeout_s:g} s", agents, sv.digest[:12])
    c = Table(title=f"recent calls (of {reply.calls_total}, {reply.fallbacks_total} run by the coordinator)",
              title_justify="left")
    for col in ("time", "client", "service", "executed by", "success", "ms"):
        c.add_column(col)
    calls = list(reply.calls)  # oldest first
    if max_calls is not None:
        calls = calls[len(calls) - max_calls:] if max_calls > 0 else []
    for call in calls:
        ok = "[green]yes[/]" if call.success else f"[red]no[/] {call.error_code}"
        who = f"{call.client} via {call.via_agent}" if call.via_agent else call.client  # a nested call: who asked
        c.add_row(datetime.fromtimestamp(call.time).strftime("%H:%M:%S.%f")[:-3], who, call.service,
                  call.executed_by, ok, f"{call.ms:.1f}")
    q = reply.scheduler
    sched = Table(title=f"scheduler (placement {reply.placement}, dispatch {reply.dispatch})", title_justify="left")
    for col in ("queue for agent slots", "coordinator slots", "jobs", "trouble"):
        sched.add_column(col)
    sched.add_row(f"{q.queue_depth} waiting (limit {q.queue_limit})\n"
                  f"waited p50 {q.queue_wait_p50_ms:.1f}, p99 {q.queue_wait_p99_ms:.1f} ms",
                  f"{q.local_running}/{q.local_slots} busy", f"{q.offloaded_total} by agents, {q.local_total} here\n"
                  f"{q.retries_total} retried, {q.hedges_total} hedged",
                  f"{q.outcome_unknown_total} outcome unknown, {q.late_results_total} late\n"
                  f"{q.quarantines_total} quarantines, {q.overloaded_total} overloaded")
    tables = [t, sched, s, c]
    if reply.coordinators:
        tables.insert(0, coordinators_table(reply))
    if reply.cache_json:
        tables.append(cache_summary(json.loads(reply.cache_json)))
    return tables


def coordinators_table(reply: Any) -> Table:
    """The cluster's live coordinators (presence on Redis), the one that answered marked."""
    t = Table(title=f"coordinators ({len(reply.coordinators)})", title_justify="left")
    for col in ("id", "listen", "peer address", "agents", "slots", "running", "calls/s", "sent on / taken", "up",
                "seen"):
        t.add_column(col)
    for co in reply.coordinators:  # sent on: calls it forwarded to a peer's agents; taken: a peer's it ran
        t.add_row(co.id + (" [green](this one)[/]" if co.here else ""), co.listen, co.peer or "-", str(co.agents),
                  str(co.slots), f"{co.running}/{co.slots}", f"{co.calls_per_s:.1f}", f"{co.forwarded} / {co.received}",
                  f"{co.uptime_s:.0f} s", "now" if co.here else f"{co.seen_s:.1f} s ago")
    return t


def cache_table(stats: dict[str, Any]) -> Table:
    """Every figure of the cache and the heap governor (`cache stats`)."""
    t = Table(title="result cache and heap governor", title_justify="left")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in stats.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        t.add_row(k, str(v))
    return t


def cmd_status(a: argparse.Namespace) -> int:
    from microcores.client import Client
    from microcores.errors import MicroError

    try:  # with the admin credential of the state directory, when readable: the operator's full view
        with Client(a.coordinator, **_client_kwargs(a)) as c:
            if a.watch:  # redrawn in place, cut to the terminal's height (the most recent calls that fit)
                from rich.live import Live

                from microswarm.render import fit_height

                def frame() -> Any:
                    reply = c.status(a.calls, agents_limit=AGENT_ROWS)
                    return fit_height(lambda n: status_tables(reply, n), out, a.calls)

                with Live(frame(), console=out, refresh_per_second=4, vertical_overflow="crop") as live:
                    while True:
                        time.sleep(a.interval)
                        live.update(frame())
            reply = c.status(a.calls, agents_limit=0 if a.json else AGENT_ROWS)
    except MicroError as exc:
        err.print(f"[red]error:[/] {exc.message}")
        return 1
    except KeyboardInterrupt:
        return 0
    if a.json:
        print(json.dumps(status_dict(reply)))
    else:
        out.print(f"coordinator {reply.coordinator_id} on {reply.listen}, up {reply.uptime_s:.0f} s, "
                  f"dispatch {reply.dispatch}")
        if reply.redacted:
            err.print("[dim]agents' ids and addresses are hidden: they are the operator's (run where the "
                      "coordinator's state directory is readable: --state-dir or MICROSWARM_STATE_DIR)[/]")
        for t in status_tables(reply):
            out.print(t)
    return 0


def cmd_cache_stats(a: argparse.Namespace) -> int:
    from microcores.client import Client
    from microcores.errors import MicroError

    try:
        with Client(a.coordinator, **_client_kwargs(a)) as c:  # the operator's credential, or a client's
            stats = c.cache_stats()
    except MicroError as exc:
        err.print(f"[red]error:[/] {exc.message}")
        return 1
    if a.json:
        print(json.dumps(stats))
    elif not stats:
        out.print("the result cache is off on this coordinator")
    else:
        out.print(cache_table(stats))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from microswarm.demo import run_demo
    return run_demo(agents=a.agents)


def cmd_bench(a: argparse.Namespace) -> int:
    if a.simulated_agents is not None:
        if a.simulated_agents < 1 or a.coordinator:
            err.print("[red]error:[/] --simulated-agents takes a number of agents (1 or more) and starts its own "
                      "coordinator (no --coordinator)")
            return 2
        from microswarm.bench_fleet import run_fleet_bench
        return run_fleet_bench(a.simulated_agents, out_path=a.output)
    if a.coordinators is not None:
        if a.coordinators < 2 or a.coordinator:
            err.print("[red]error:[/] --coordinators takes a number of coordinators (2 or more) and starts them, "
                      "with a PostgreSQL and a Redis of its own (no --coordinator)")
            return 2
        from microswarm.bench_coordinators import run_coordinators_bench
        return run_coordinators_bench(a.coordinators, quick=a.quick, out_path=a.output)
    from microswarm.bench import run_bench
    return run_bench(coordinator=a.coordinator, quick=a.quick, out_path=a.output)


# ---------------------------------------------------------------- parser

STATE_URL_HELP = ("keep the shared state (registry and packages, join tokens, key bindings, clients, token hashes) "
                  "in this PostgreSQL database (postgresql://USER:PASSWORD@HOST:PORT/DB), so several coordinators "
                  "with copies of one --state-dir identity serve one cluster")
TOKEN_URL_HELP = ("the coordinators' PostgreSQL (--state-url of `coordinator start`); default: MICROSWARM_STATE_URL, "
                  "else the one the coordinator of --state-dir runs with, else its files")
STATE_HELP = ("the coordinator's state directory: its key, tokens, clients, call log "
              "(env MICROSWARM_STATE_DIR; default: ~/.local/state/microswarm)")

# arguments that cli_calls.add_parsers leaves without help
_FILL_HELP = {"service": "the service's name, e.g. math.compute",
              "id": "the call's id, as `microswarm submit` printed it"}


def _daemon_args(p: argparse.ArgumentParser, section: str) -> None:
    """What both daemons take: logging and a settings file."""
    p.add_argument("--log-level", default="info", metavar="LEVEL",
                   help="log this level and above: debug, info, warning, error")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="log lines as text, or as one JSON object each (for a log collector)")
    p.add_argument("--config", default=os.environ.get("MICROSWARM_CONFIG"), metavar="FILE",
                   help=env_help(f"settings from a TOML file ([{section}] table); flags override it",
                                 "MICROSWARM_CONFIG", None))


def build_parser() -> argparse.ArgumentParser:
    from microcores import __version__
    p = Parser(prog="microswarm", description="Dynamic task offloading to volunteer agents.",
               epilog="`microswarm COMMAND --help` says what each command takes, and its defaults.")
    p.add_argument("--version", action="version", version=f"microswarm {__version__}")
    sub = p.add_subparsers(dest="command")

    co = sub.add_parser("coordinator", help="run or manage the coordinator daemon")
    cosub = co.add_subparsers(dest="action", required=True)
    st = cosub.add_parser("start", help="start the coordinator daemon")
    st.add_argument("--listen", default=os.environ.get("MICROSWARM_LISTEN", "127.0.0.1:7070"), metavar="HOST:PORT",
                    help=env_help("serve agents and clients (gRPC) here; 0.0.0.0:7070 for the LAN",
                                  "MICROSWARM_LISTEN", "127.0.0.1:7070"))
    st.add_argument("--state-dir", default=None, metavar="DIR", help=STATE_HELP)
    st.add_argument("--state-url", default=os.environ.get("MICROSWARM_STATE_URL"), metavar="URL",
                    help=env_help(STATE_URL_HELP, "MICROSWARM_STATE_URL", "files in --state-dir"))
    st.add_argument("--dispatch", default="random", choices=["random", "round_robin", "least_loaded", "p2c"],
                    help="how a job picks among the agents with a free slot (p2c: the less loaded of two sampled)")
    st.add_argument("--placement", default="all", choices=["all", "arbitrary", "common", "expensive", "combined"],
                    help="which agents hold which packages: all, or ranked by calls/min (common), mean run time "
                         "(expensive), both (combined), or at random (arbitrary)")
    st.add_argument("--queue-wait", type=float, default=2.0, metavar="S",
                    help="a call waits this long for an agent slot before the coordinator runs it itself")
    st.add_argument("--queue-limit", type=int, default=10_000, metavar="N",
                    help="calls that may wait for an agent slot; past it a call is answered 'overloaded'")
    st.add_argument("--local-slots", type=int, default=None, metavar="N",
                    help="jobs the coordinator runs at once itself (default: its CPU count; 0: never)")
    st.add_argument("--max-attempts", type=int, default=3, metavar="N",
                    help="executors one job may try, the coordinator included, when it fails or times out")
    st.add_argument("--quarantine", type=float, default=10.0, metavar="S",
                    help="an agent that keeps failing jobs gets none for S seconds, doubled on each repeat")
    st.add_argument("--hedge", action=argparse.BooleanOptionalAction, default=True,
                    help="send a second copy of a job running past its service's recent p95 (pure or "
                         "idempotent services only)")
    st.add_argument("--worker-idle", type=float, default=120.0, metavar="S",
                    help="the coordinator's own workers stop after sitting idle this long (0: never)")
    st.add_argument("--verify", choices=["adaptive", "always", "off"], default="adaptive",
                    help="results of pure services: 'always' confirms each on a second executor; 'adaptive' "
                         "confirms those of agents that have not earned trust, and spot-checks the rest; "
                         "'off' accepts them as they come")
    st.add_argument("--trust-after", type=int, default=10, metavar="N",
                    help="agreements in a row after which an agent's results are only spot-checked (adaptive)")
    st.add_argument("--spot-check", type=float, default=0.05, metavar="P",
                    help="chance that a trusted agent's result is still confirmed (adaptive)")
    st.add_argument("--heartbeat", type=float, default=1.0, metavar="S", help="agent heartbeat interval")
    st.add_argument("--liveness", type=float, default=6.0, metavar="S",
                    help="an agent silent this long is removed (suspect after half); past --heartbeat-budget "
                         "agents the heartbeat interval and this window grow with the fleet")
    st.add_argument("--heartbeat-budget", type=float, default=800.0, metavar="N",
                    help="heartbeats a second from the whole fleet at most: past N agents each heartbeats every "
                         "agents/N seconds")
    st.add_argument("--handshake-rate", type=float, default=10.0, metavar="N",
                    help="agent handshakes one address may start a second (burst 4x); raise it when many "
                         "volunteers share one public address")
    st.add_argument("--fallback-slots", type=int, default=0, metavar="N", help=argparse.SUPPRESS)
    st.add_argument("--drain", type=float, default=30.0, metavar="S", help="on SIGTERM, wait this long for calls")
    st.add_argument("--no-cache", action="store_true", help="turn the result cache off")
    st.add_argument("--cache-url", default=os.environ.get("MICROSWARM_CACHE_URL"), metavar="URL",
                    help=env_help("a shared result region on Redis (redis://HOST:PORT/DB) behind this coordinator's "
                                  "cache, which stays as its near cache; coordinators on one Redis also see each "
                                  "other in `status`", "MICROSWARM_CACHE_URL", "off"))
    st.add_argument("--cache-write", choices=["through", "behind"], default="through",
                    help="through: a result is in Redis before its answer goes out; behind: queued and written in "
                         "batches (a crash loses at most the queue) (default: through)")
    st.add_argument("--cache-write-queue", type=int, default=10_000, metavar="N",
                    help="write-behind: entries queued at most; past it the oldest are dropped (default 10000)")
    st.add_argument("--cache-write-batch", type=int, default=256, metavar="N",
                    help="write-behind: entries per batch; a batch goes as soon as this many wait (default 256)")
    st.add_argument("--cache-write-interval", type=float, default=0.05, metavar="S",
                    help="write-behind: a batch at least every S seconds (default 0.05)")
    st.add_argument("--peer-address", default=os.environ.get("MICROSWARM_PEER_ADDRESS"), metavar="HOST:PORT",
                    help=env_help("where the cluster's other coordinators reach this one (with --cache-url); a "
                                  "wildcard --listen host is replaced by this host's address", "MICROSWARM_PEER_ADDRESS",
                                  "--listen"))
    st.add_argument("--forward", action=argparse.BooleanOptionalAction, default=True,
                    help="send a call that no agent of this coordinator can take to another coordinator of the "
                         "cluster whose agents can (with --cache-url; default: yes)")
    st.add_argument("--max-heap", default=None, metavar="SIZE",
                    help="memory budget of the coordinator process, like -Xmx (e.g. 2GiB; default: 25%% of the "
                         "machine's or container's memory)")
    st.add_argument("--eviction-threshold", type=float, default=None, metavar="PCT",
                    help="percent of max heap above which the cache evicts LRU entries (default 60)")
    st.add_argument("--soft-target", type=float, default=None, metavar="PCT",
                    help="percent of max heap above which the governor collects (like SoftMaxHeapSize; default: "
                         "5 below --eviction-threshold)")
    st.add_argument("--critical-threshold", type=float, default=None, metavar="PCT",
                    help="percent of max heap above which the cache admits nothing new (default: 90)")
    st.add_argument("--http", default=os.environ.get("MICROSWARM_HTTP"), metavar="HOST:PORT",
                    help=env_help("also serve the HTTP/JSON gateway (OAuth 2.0, /v1/..., /openapi.json, /docs) here",
                                  "MICROSWARM_HTTP", "off"))
    st.add_argument("--token-ttl", type=float, default=3600.0, metavar="S", help="lifetime of access tokens")
    st.add_argument("--metrics-auth", action="store_true",
                    help="/metrics needs a bearer token (by default it is readable, as exporters are)")
    st.add_argument("--advertise", action=argparse.BooleanOptionalAction, default=None,
                    help="advertise on the LAN with zeroconf (default: yes, unless listening on loopback)")
    st.add_argument("--result-ttl", type=float, default=3600.0, metavar="S",
                    help="a submitted call's envelope is kept S seconds after it ends (then `unknown_call`)")
    st.add_argument("--tls-cert", default=os.environ.get("MICROSWARM_TLS_CERT"), metavar="PEM",
                    help=env_help("serve this certificate chain (leaf first) on gRPC and HTTP instead of the one "
                                  "made from the coordinator's key; needs --tls-key", "MICROSWARM_TLS_CERT",
                                  "the coordinator's own"))
    st.add_argument("--tls-key", default=os.environ.get("MICROSWARM_TLS_KEY"), metavar="PEM",
                    help=env_help("the private key of --tls-cert (PEM, unencrypted; keep it 0600)",
                                  "MICROSWARM_TLS_KEY", None))
    st.add_argument("--insecure", action="store_true",
                    help="no TLS on gRPC and HTTP: credentials travel in cleartext (a trusted loopback only)")
    st.add_argument("--publisher-key", action="append", default=None, metavar="PUB",
                    help="accept only packages signed by this publisher key (a .pub file of `microswarm keys "
                         "create`; repeatable); join tokens carry the keys and agents check them too")
    _daemon_args(st, "coordinator")
    st.set_defaults(func=cmd_coordinator_start, config_section="coordinator")
    tk = cosub.add_parser("token", help="print a join token for agents (shared, or one volunteer's with --name)")
    tk.add_argument("--state-dir", default=None, metavar="DIR", help=STATE_HELP)
    tk.add_argument("--state-url", default=None, metavar="URL", help=TOKEN_URL_HELP)
    tk.add_argument("--new", action="store_true", help="mint a new shared join secret instead of the default one")
    tk.add_argument("--name", default=None, metavar="NAME",
                    help="a token of the volunteer NAME's own (the same one again if it exists), revocable alone")
    tk.add_argument("--max-agents", type=int, default=None, metavar="N",
                    help="with --name: at most N of its agents at once (0: no cap)")
    tk.add_argument("--max-slots", type=int, default=None, metavar="M",
                    help="with --name: at most M slots for its agents together; an agent asking more gets what "
                         "remains (0: no cap)")
    tk.set_defaults(func=cmd_coordinator_token)
    tks = cosub.add_parser("tokens", help="volunteers' join tokens: list, revoke")
    tksub = tks.add_subparsers(dest="tokens_action", required=True)
    tl = tksub.add_parser("list", help="the volunteer tokens, their caps and state (never their secrets)")
    tl.add_argument("--state-dir", default=None, metavar="DIR", help=STATE_HELP)
    tl.add_argument("--state-url", default=None, metavar="URL", help=TOKEN_URL_HELP)
    tl.add_argument("--json", action="store_true", help="one JSON array instead of the table")
    tl.set_defaults(func=cmd_coordinator_tokens_list)
    tr = tksub.add_parser("revoke", help="revoke a volunteer's token: its agents are disconnected and refused")
    tr.add_argument("name", help="the volunteer's name, as given to `coordinator token --name`")
    tr.add_argument("--state-dir", default=None, metavar="DIR", help=STATE_HELP)
    tr.add_argument("--state-url", default=None, metavar="URL", help=TOKEN_URL_HELP)
    tr.set_defaults(func=cmd_coordinator_tokens_revoke)

    ag = sub.add_parser("agent", help="run a volunteer agent")
    agsub = ag.add_subparsers(dest="action", required=True)
    ast = agsub.add_parser("start", help="join a coordinator and serve jobs")
    ast.add_argument("--coordinator", default=None, metavar="HOST:PORT[,HOST:PORT...]",
                     help=env_help("the coordinator to join; several of one cluster, comma-separated: the agent "
                                   "moves to another when its own goes away", "MICROSWARM_COORDINATOR",
                                   "127.0.0.1:7070"))
    ast.add_argument("--token", default=None, help="join token, from `microswarm coordinator token` "
                                                   "(env MICROSWARM_TOKEN; the variable keeps it out of `ps`)")
    ast.add_argument("--slots", type=int, default=max(1, (os.cpu_count() or 2) // 2), metavar="N",
                     help="jobs run at once (default: half this machine's CPUs, here %(default)s)")
    ast.add_argument("--id", default=None,
                     help="agent id (default: host name and a random suffix, kept in the state directory)")
    ast.add_argument("--state-dir", default=None, metavar="DIR",
                     help="where the agent's key, its id and verified packages are kept (env "
                          "MICROSWARM_STATE_DIR; default: ~/.local/state/microswarm)")
    ast.add_argument("--drain", type=float, default=60.0, metavar="S",
                     help="on SIGTERM, wait this long for running jobs")
    ast.add_argument("--discover", action="store_true",
                     help="find the coordinator on the LAN (zeroconf) by the key its token pins")
    ast.add_argument("--discover-timeout", type=float, default=10.0, metavar="S",
                     help="how long each LAN search lasts")
    ast.add_argument("--max-cpu", type=float, default=0.0, metavar="PERCENT",
                     help="jobs use at most this share of the machine's CPU (100 = every core; 0: no limit)")
    ast.add_argument("--max-memory", default=None, metavar="SIZE",
                     help="memory for jobs, e.g. 2GiB: each job's address space, and all jobs' resident memory "
                          "(default: no limit)")
    ast.add_argument("--max-job-cpu", type=int, default=0, metavar="S",
                     help="CPU seconds one job may use (RLIMIT_CPU; 0: no limit)")
    ast.add_argument("--max-packages", type=int, default=0, metavar="N",
                     help="hold at most N packages (0: no limit); the coordinator's placement respects it")
    ast.add_argument("--worker-idle", type=float, default=120.0, metavar="S",
                     help="a package's worker processes stop after sitting idle this long (0: never)")
    ast.add_argument("--idle-only", action="store_true",
                     help="take jobs only while the rest of the machine is idle; hand them back when it is not")
    ast.add_argument("--idle-threshold", type=float, default=25.0, metavar="PERCENT",
                     help="with --idle-only: others using more of the CPU than this means the owner is busy")
    ast.add_argument("--idle-wait", type=float, default=30.0, metavar="S",
                     help="with --idle-only: seconds of idleness before taking jobs (again)")
    ast.add_argument("--insecure", action="store_true", default=None,
                     help="plaintext to a coordinator started with --insecure (env MICROSWARM_INSECURE=1); the "
                          "link is still sealed and the coordinator's key still proven by the handshake")
    ast.add_argument("--require-sandbox", action="store_true",
                     help="refuse to start unless job workers can run in the namespace sandbox (bwrap)")
    _daemon_args(ast, "agent")
    ast.set_defaults(func=cmd_agent_start, config_section="agent")
    for action, text in (("pause", "stop taking jobs (running ones go back to the coordinator)"),
                         ("resume", "take jobs again"), ("status", "the agent's mode, usage and limits (JSON)")):
        ap = agsub.add_parser(action, help=text)
        ap.add_argument("--state-dir", default=None, metavar="DIR", help="the running agent's --state-dir")
        if action == "pause":
            ap.add_argument("--finish", action="store_true", help="let the running jobs finish here")
        ap.set_defaults(func=cmd_agent_control)

    pu = sub.add_parser("publish", help="publish every MicroCore subclass in a file or package")
    pu.add_argument("path", help="a .py file or a package directory")
    pu.add_argument("--wait", type=float, default=60.0, metavar="S",
                    help="wait up to S seconds for the connected agents to install it (0: do not wait)")
    _client_args(pu)
    pu.add_argument("--sign-with", default=os.environ.get("MICROSWARM_SIGN_WITH"), metavar="KEY",
                    help="sign the packages here with this publisher key (`microswarm keys create`); needed "
                         "when the coordinator runs with --publisher-key (env MICROSWARM_SIGN_WITH)")
    pu.set_defaults(func=cmd_publish)

    ke = sub.add_parser("keys", help="publisher keys: sign packages off the coordinator")
    kesub = ke.add_subparsers(dest="action", required=True)
    kc = kesub.add_parser("create", help="make a publisher key pair: the private key at PATH (0600), the public "
                                         "at PATH.pub (give it to `coordinator start --publisher-key`)")
    kc.add_argument("path", metavar="PATH", help="where to write the private key (never overwritten)")
    kc.set_defaults(func=cmd_keys_create)

    from microswarm import cli_calls
    cli_calls.add_parsers(sub, _client_args)
    from microswarm import cli_routes
    cli_routes.add_parsers(sub, _client_args)

    ca = sub.add_parser("call", help="call a service with a JSON input")
    ca.add_argument("service", help=_FILL_HELP["service"])
    ca.add_argument("input", nargs="?", default="{}", help="the input, JSON")
    ca.add_argument("--json", action="store_true", help="print the whole response envelope")
    ca.add_argument("--timeout", type=float, default=None, metavar="S",
                    help="the call's deadline in seconds (default: the service's own timeout)")
    _client_args(ca)
    ca.set_defaults(func=cmd_call)

    sa = sub.add_parser("status", help="agents, services and recent calls")
    sa.add_argument("--json", action="store_true", help="one JSON object, every figure (the cache's too)")
    sa.add_argument("--calls", type=int, default=20, metavar="N", help="show the N most recent calls")
    sa.add_argument("--watch", action="store_true",
                    help="redraw in place until interrupted (recent calls cut to what the terminal holds)")
    sa.add_argument("--interval", type=float, default=1.0, metavar="S", help="with --watch: redraw every S seconds")
    _client_args(sa)
    sa.set_defaults(func=cmd_status)

    cc = sub.add_parser("cache", help="the coordinator's result cache")
    ccsub = cc.add_subparsers(dest="action", required=True)
    cs = ccsub.add_parser("stats", help="cache and heap governor figures")
    cs.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    _client_args(cs)
    cs.set_defaults(func=cmd_cache_stats)

    cl = sub.add_parser("clients", help="clients of the gateway: credentials for calling services")
    clsub = cl.add_subparsers(dest="action", required=True)
    cc_ = clsub.add_parser("create", help="create a client; prints its id and secret once")
    cc_.add_argument("name", help="a name for it, to know it by in `clients list`")
    cc_.add_argument("--scope", action="append", metavar="PATTERN",
                     help="services it may call, a glob over names (repeatable; default: '*')")
    cc_.add_argument("--json", action="store_true", help="one JSON object with client_id and client_secret")
    _client_args(cc_)
    cc_.set_defaults(func=cmd_clients_create)
    cls_ = clsub.add_parser("list", help="the clients (never their secrets)")
    cls_.add_argument("--all", action="store_true", help="revoked ones too")
    cls_.add_argument("--json", action="store_true", help="one JSON array instead of the table")
    _client_args(cls_)
    cls_.set_defaults(func=cmd_clients_list)
    clr = clsub.add_parser("revoke", help="revoke a client and every token it holds")
    clr.add_argument("client", help="client id or name")
    _client_args(clr)
    clr.set_defaults(func=cmd_clients_revoke)

    de = sub.add_parser("demo", help="a coordinator and two agents on loopback, serving real calls")
    de.add_argument("--agents", type=int, default=2, metavar="N", help="agents to start")
    de.set_defaults(func=cmd_demo)

    be = sub.add_parser("bench", help="latency, throughput and payload benchmark")
    be.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                    help="benchmark a running coordinator instead of starting one")
    be.add_argument("--quick", action="store_true", help="fewer samples")
    be.add_argument("--output", default=None, metavar="FILE", help="also write the JSON here")
    be.add_argument("--coordinators", type=int, default=None, metavar="N",
                    help="N coordinators of one cluster on this machine, sharing a PostgreSQL and a Redis the bench "
                         "starts: calls/s, p50, a hit served from Redis, and the failover when one is SIGKILLed")
    be.add_argument("--simulated-agents", type=int, default=None, metavar="N",
                    help="instead: one coordinator under N simulated agents (real handshake, sealing, heartbeats "
                         "and jobs, from a few processes): its memory, idle CPU, Status and calls/s")
    be.set_defaults(func=cmd_bench)
    fill_help(p, _FILL_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `microswarm`: what it can do
        parser.print_help()
        return 0
    if args.command not in ("coordinator", "agent"):
        # gRPC core's own lines (a failed TLS handshake, say) repeat what the command says better
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    if getattr(args, "config_section", None):
        from microswarm.config import apply_config
        try:
            args = apply_config(parser, argv, args)
        except (OSError, ValueError) as exc:
            from rich.markup import escape
            err.print(f"[red]error:[/] {escape(str(exc))}")
            return 2
        args.coordinator_given = getattr(args, "coordinator", None) is not None
    if getattr(args, "coordinator", None) is None and hasattr(args, "coordinator") and args.command != "bench":
        args.coordinator = _coordinator_default()
    if hasattr(args, "state_dir") and args.state_dir is None:
        args.state_dir = _state_default()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
