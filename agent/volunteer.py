"""What a volunteer keeps: limits on the agent's jobs, idle-only, pause and resume.

- `--max-cpu PERCENT`: the job workers together use at most this share of the machine's CPU
  (100 = every core). Enforced by a duty-cycle throttle: the workers' CPU time is sampled every
  50 ms and, once a period's budget is spent, they are held with SIGSTOP until the next period.
- `--max-memory SIZE`: each job's worker runs under RLIMIT_AS of SIZE (an allocation past it
  fails: `memory_limit`), and the workers together may keep at most SIZE resident: past it the
  largest busy one is stopped (`memory_limit`).
- `--max-job-cpu SECONDS`: each job may use this much CPU time (RLIMIT_CPU, set by the worker
  before each job; the kernel's SIGXCPU ends it: `cpu_time_limit`).
- `--idle-only`: take jobs only while the rest of the machine is idle: the CPU used by every
  process but the agent and its workers stays under `--idle-threshold` percent for
  `--idle-wait` seconds. When the owner comes back, running jobs are handed back to the
  coordinator (which runs them itself) and the agent takes no new ones until idle again.
- pause / resume: `microswarm agent pause|resume` over a unix socket in the agent's state
  directory (`agent.sock`, mode 0600), or SIGUSR1 (pause) / SIGUSR2 (resume).

Every job worker also runs with PR_SET_NO_NEW_PRIVS and at a lower priority (nice 10).
A stopped job is reported to the coordinator as an agent fault naming the limit, so the
coordinator's fallback answers the caller; the agent stays up.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from microcores._worker import Worker

log = logging.getLogger("microswarm.agent")

SOCKET_NAME = "agent.sock"
THROTTLE_PERIOD_S = 0.5
TICK_S = 0.05
PROBE_S = 0.5  # the idle probe's interval; two busy readings in a row mean the owner is back
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "ki": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "mi": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "gi": 2**30,
          "t": 10**12, "tb": 10**12, "tib": 2**40, "ti": 2**40}


def parse_size(text: str | float) -> int:
    """'512MiB', '2G', '1.5GB', '1048576' -> bytes; ValueError with a clear message otherwise."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE_RE.match(str(text))
    unit = (m.group(2) or "").lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"size {text!r} is not understood: write e.g. 512MiB, 2GiB, 1.5GB or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass
class VolunteerSettings:
    max_cpu: float = 0.0          # percent of the machine's CPU for all jobs; 0: no throttle
    max_memory: int = 0           # bytes; 0: no limit
    max_job_cpu: int = 0          # CPU seconds per job; 0: no limit
    idle_only: bool = False
    idle_threshold: float = 25.0  # percent of the machine used by others that counts as "owner busy"
    idle_wait: float = 30.0       # seconds of idleness before jobs are taken (again)
    nice: int = 10

    def check(self) -> None:
        if not 0 <= self.max_cpu <= 100:
            raise ValueError(f"--max-cpu {self.max_cpu:g} must be a percent between 1 and 100 (0: no limit)")
        if self.max_memory and self.max_memory < 64 * 2**20:
            raise ValueError(f"--max-memory {self.max_memory} bytes is below 64 MiB: a job's worker alone "
                             "needs about that much address space")
        if self.max_job_cpu < 0:
            raise ValueError("--max-job-cpu must be a number of seconds (0: no limit)")
        if not 0 < self.idle_threshold <= 100:
            raise ValueError("--idle-threshold must be a percent between 1 and 100")
        if self.idle_wait < 0:
            raise ValueError("--idle-wait must be zero or more seconds")

    def worker_env(self) -> dict[str, str] | None:
        """Environment for this agent's job workers: they apply the limits to themselves at start."""
        env = dict(os.environ)
        env["MICROSWARM_WORKER_NICE"] = str(self.nice)
        if self.max_memory:
            env["MICROSWARM_JOB_MAX_AS"] = str(self.max_memory)
        if self.max_job_cpu:
            env["MICROSWARM_JOB_CPU_S"] = str(int(self.max_job_cpu))
        return env

    def describe(self) -> dict[str, Any]:
        return {"max_cpu": self.max_cpu, "max_memory": self.max_memory, "max_job_cpu": self.max_job_cpu,
                "idle_only": self.idle_only, "idle_threshold": self.idle_threshold, "idle_wait": self.idle_wait}


# ---------------------------------------------------------------- measuring

def _proc_cpu(p: psutil.Process, children: bool = True) -> float:
    t = p.cpu_times()
    total = t.user + t.system
    if children:
        total += getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
    return total


class IdleProbe:
    """How much of the machine's CPU everything but the agent uses, in percent of all cores.

    Reads the kernel's CPU counters (/proc/stat through psutil) and subtracts the CPU time of
    the agent, its job workers and their finished children over the same interval. The file
    named by MICROSWARM_IDLE_PROBE_FILE, when set, replaces the reading (for tests: a number
    of percent)."""

    def __init__(self, own_pids: Any) -> None:
        self.own_pids = own_pids  # callable -> iterable of live worker pids
        self.override = os.environ.get("MICROSWARM_IDLE_PROBE_FILE", "")
        self._procs: dict[int, psutil.Process] = {}
        self._last: tuple[float, float, float] | None = None

    @staticmethod
    def _system() -> tuple[float, float]:
        t = psutil.cpu_times()
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        idle = t.idle + getattr(t, "iowait", 0.0)
        return total, total - idle

    def _own(self) -> float:
        me = psutil.Process()
        total = _proc_cpu(me)
        live = set()
        for pid in self.own_pids():
            live.add(pid)
            p = self._procs.get(pid)
            try:
                if p is None:
                    p = self._procs[pid] = psutil.Process(pid)
                total += _proc_cpu(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                self._procs.pop(pid, None)
        for pid in list(self._procs):
            if pid not in live:
                del self._procs[pid]
        return total

    def sample(self) -> float | None:
        """Others' CPU percent since the previous sample (None on the first)."""
        if self.override:
            try:
                return float(Path(self.override).read_text().strip() or 0)
            except (OSError, ValueError):
                return None
        total, busy = self._system()
        own = self._own()
        last, self._last = self._last, (total, busy, own)
        if last is None or total <= last[0]:
            return None
        d_total = total - last[0]
        others = (busy - last[1]) - (own - last[2])
        return max(0.0, min(100.0, 100.0 * others / d_total))


# ---------------------------------------------------------------- enforcing

class Monitor:
    """Samples the job workers: CPU throttle, resident-memory budget, usage figures, idle probe."""

    def __init__(self, settings: VolunteerSettings, workers: Any, on_idle_change: Any) -> None:
        self.s = settings
        self.workers = workers            # callable -> list of (Worker, busy: bool)
        self.on_idle_change = on_idle_change  # callable(owner_busy: bool)
        self.ncpu = psutil.cpu_count() or 1
        self.probe = IdleProbe(lambda: [w.pid for w, _ in self.workers() if w.pid])
        self.jobs_cpu_percent = 0.0
        self.jobs_rss = 0
        self.others_cpu_percent = 0.0
        self.owner_busy = settings.idle_only  # idle-only starts by waiting for idleness
        self.stopped: set[int] = set()    # pids held by the throttle
        self._procs: dict[int, psutil.Process] = {}
        self._idle_since: float | None = None
        self._busy_samples = 0
        self.throttled_s = 0.0

    def _cpu_of(self, pid: int) -> float:
        p = self._procs.get(pid)
        try:
            if p is None:
                p = self._procs[pid] = psutil.Process(pid)
            return _proc_cpu(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            self._procs.pop(pid, None)
            return 0.0

    def _signal(self, pids: set[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def release(self) -> None:
        """Let every held worker run again (before stopping, pausing, or closing a worker)."""
        if self.stopped:
            self._signal(self.stopped, signal.SIGCONT)
            self.stopped.clear()

    async def run(self) -> None:
        period_start: float | None = None
        period_used = 0.0                 # workers' CPU seconds in this throttle period
        usage_t0, usage_acc = time.monotonic(), 0.0  # for the 1-second usage figures
        last_cpu: dict[int, float] = {}   # per worker: CPU seconds at the previous tick
        last_probe = 0.0
        tick = TICK_S if self.s.max_cpu else 0.5
        try:
            while True:
                await asyncio.sleep(tick)
                now = time.monotonic()
                ws = [(w, busy) for w, busy in self.workers() if w.pid and w.alive]
                pids = {w.pid for w, _ in ws}
                for pid in list(self._procs):
                    if pid not in pids:
                        del self._procs[pid]
                self.stopped &= pids
                # CPU used since the last tick, per process: a worker that just appeared counts
                # from now, not with the CPU it spent starting
                cpu = {pid: self._cpu_of(pid) for pid in pids}
                used = sum(max(0.0, v - last_cpu[pid]) for pid, v in cpu.items() if pid in last_cpu)
                last_cpu = cpu
                period_used += used
                usage_acc += used

                if self.s.max_cpu:  # duty-cycle throttle over all workers
                    budget = self.s.max_cpu / 100.0 * self.ncpu * THROTTLE_PERIOD_S
                    if period_start is None or now - period_start >= THROTTLE_PERIOD_S:
                        # what the last period overspent (ticks are 50 ms apart) is owed by this one
                        debt = 0.0 if period_start is None else min(4 * budget, max(0.0, period_used - budget))
                        if self.stopped and period_start is not None:
                            self.throttled_s += now - period_start
                        period_start, period_used = now, debt
                        if debt < budget:
                            self.release()
                    if period_used >= budget and not self.stopped:
                        busy = {w.pid for w, b in ws if b}
                        self._signal(busy, signal.SIGSTOP)
                        self.stopped |= busy

                if now - usage_t0 >= 1.0:
                    self.jobs_cpu_percent = 100.0 * usage_acc / ((now - usage_t0) * self.ncpu)
                    usage_t0, usage_acc = now, 0.0
                    self.jobs_rss = self._rss(ws)
                    if self.s.max_memory:
                        self._check_memory([(w, b) for w, b in ws if b])
                if now - last_probe >= PROBE_S - 0.01:
                    last_probe = now
                    self._probe(now)
        finally:
            self.release()

    def _rss(self, ws: list[tuple[Worker, bool]]) -> int:
        total = 0
        for w, _ in ws:
            p = self._procs.get(w.pid)
            try:
                if p is not None:
                    total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _check_memory(self, busy: list[tuple[Worker, bool]]) -> None:
        """The workers running jobs may keep at most --max-memory resident, together; past it the
        largest is stopped. (Idle pre-started workers are not counted: they hold no job.)"""
        sizes = []
        for w, _ in busy:
            p = self._procs.get(w.pid)
            try:
                if p is not None:
                    sizes.append((p.memory_info().rss, w))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        total = sum(r for r, _ in sizes)
        if sizes and total > self.s.max_memory:
            rss, w = max(sizes, key=lambda x: x[0])
            log.warning("running jobs hold %.0f MiB, over --max-memory %.0f MiB: stopping the largest (%.0f MiB)",
                        total / 2**20, self.s.max_memory / 2**20, rss / 2**20)
            w.stop(f"memory_limit: the agent's running jobs held {total / 2**20:.0f} MiB, over its "
                   f"--max-memory of {self.s.max_memory / 2**20:.0f} MiB; the largest job was stopped")

    def _probe(self, now: float) -> None:
        others = self.probe.sample()
        if others is None:
            return
        self.others_cpu_percent = others
        if not self.s.idle_only:
            return
        if others > self.s.idle_threshold:
            self._idle_since = None
            self._busy_samples += 1
            if not self.owner_busy and self._busy_samples >= 2:  # two readings in a row: not a blip
                self.owner_busy = True
                log.info("the machine's owner is busy (others use %.0f%% CPU): handing work back", others)
                self.on_idle_change(True)
        else:
            self._busy_samples = 0
            if self._idle_since is None:
                self._idle_since = now
            if self.owner_busy and now - self._idle_since >= self.s.idle_wait:
                self.owner_busy = False
                log.info("the machine is idle (others use %.0f%% CPU for %.0f s): taking jobs", others,
                         self.s.idle_wait)
                self.on_idle_change(False)


# ---------------------------------------------------------------- the control channel

def socket_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir).expanduser() / SOCKET_NAME


class ControlServer:
    """A unix socket in the agent's state directory: one JSON request per line, one JSON reply."""

    def __init__(self, path: Path, handler: Any) -> None:
        self.path = path
        self.handler = handler  # callable(dict) -> dict
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> bool:
        if len(str(self.path)) > 100:
            log.warning("no control socket: the path %s is too long for a unix socket; use SIGUSR1/SIGUSR2",
                        self.path)
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.exists():
            try:  # another agent on this state directory?
                _r, w = await asyncio.wait_for(asyncio.open_unix_connection(str(self.path)), 1)
                w.close()
                log.warning("another agent answers on %s: this one has no control socket", self.path)
                return False
            except (TimeoutError, OSError):
                self.path.unlink(missing_ok=True)
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            try:
                req = json.loads(line or b"{}")
                reply = self.handler(req if isinstance(req, dict) else {})
            except ValueError as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
            self.path.unlink(missing_ok=True)


def control(state_dir: str | os.PathLike[str], command: str, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
    """Send one command to the agent whose state directory is `state_dir` (used by the CLI)."""
    import socket

    path = socket_path(state_dir)
    if not path.exists():
        raise ConnectionError(f"no agent control socket at {path}: is an agent running with --state-dir "
                              f"{state_dir}?")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as exc:
            raise ConnectionError(f"the agent does not answer on {path}: {exc}") from None
        s.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf or b"{}")
