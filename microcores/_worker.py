"""Isolated worker processes that run one package's service, for agents and the coordinator.

A worker is `python -m microcores._worker DIR`: it loads the extracted package in DIR and runs
one job at a time, talking to its parent over stdin/stdout in length-prefixed msgpack frames
(its own prints go to stderr). A nested `self.call()` goes up to the parent, which forwards it
to the coordinator. One process per package version means a new version is a new process,
and a job that overruns its deadline is stopped by killing its process.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from . import _codec
from ._sandbox import Sandbox, inner_env, worker_env
from .errors import DeadlineExceeded, MicroError, Unavailable, from_code

log = logging.getLogger("microswarm.worker")

HEADER = struct.Struct(">I")
GROUP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2}
MAX_PIPE_MESSAGE = _codec.MAX_PAYLOAD + 1024 * 1024
START_TIMEOUT = 60.0
PIPE_PIECE = 1 << 20  # a job's input goes to its worker in writes of this size (the pipe's, see _widen_pipe)


# ---------------------------------------------------------------- the worker process

def _read_exact(f: Any, n: int) -> bytes:
    buf: bytes | None = f.read(n)
    if buf is None or len(buf) < n:
        raise EOFError
    return buf


# A job's input (parent -> worker) and its result's output (worker -> parent) do not go inside the
# msgpack frame: the frame says {"blob": n} and the n raw bytes follow it on the pipe. Neither side
# copies the payload into a frame (a msgpack re-pack) nor out of one (a msgpack unpack of the bin).
BLOB = "blob"


def _recv(f: Any) -> dict[str, Any]:
    (n,) = HEADER.unpack(_read_exact(f, HEADER.size))
    if n > MAX_PIPE_MESSAGE:
        raise EOFError
    msg: dict[str, Any] = _codec.unpack(_read_exact(f, n), limit=MAX_PIPE_MESSAGE)
    size = msg.pop(BLOB, None)
    if size is not None:  # a job's input follows its frame (the two within MAX_PIPE_MESSAGE, as one frame was)
        if not isinstance(size, int) or not 0 <= size <= MAX_PIPE_MESSAGE - n:
            raise EOFError
        msg["input"] = _read_exact(f, size)
    return msg


_WRITE_LOCK = threading.Lock()  # the job's thread and a progress timer both write to the parent


def _send(f: Any, msg: dict[str, Any], blob: bytes | None = None) -> None:
    """One frame; `blob` (a result's output) follows it raw, written from its own buffer."""
    data = _codec.pack(msg if blob is None else {**msg, BLOB: len(blob)})
    with _WRITE_LOCK:
        f.write(HEADER.pack(len(data)) + data)
        if blob:
            f.write(blob)
        f.flush()


PROGRESS_INTERVAL_S = 0.1  # at most ~10 progress messages a second per job leave the worker


class ProgressLimiter:
    """`self.progress()` of one job, rate-limited: an update goes out at once when the last one left
    PROGRESS_INTERVAL_S ago or more; otherwise it waits (replacing any that waits) and a timer sends
    it when the interval is up, so the last one always arrives, at most that late. `close()` at the
    job's end sends what still waits (before the result) and stops the timer."""

    def __init__(self, send: Callable[[float, str], None], interval: float = PROGRESS_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._send, self.interval, self.clock = send, interval, clock
        self._lock = threading.Lock()
        self._last = -1e18
        self._pending: tuple[float, str] | None = None
        self._timer: threading.Timer | None = None
        self._closed = False
        self.sent = 0

    def report(self, fraction: float, message: str) -> None:
        with self._lock:
            if self._closed:
                return
            now = self.clock()
            if now - self._last >= self.interval and self._timer is None:
                self._last = now
                self._emit(fraction, message)
                return
            self._pending = (fraction, message)
            if self._timer is None:
                self._timer = threading.Timer(max(0.0, self._last + self.interval - now), self._due)
                self._timer.daemon = True
                self._timer.start()

    def _due(self) -> None:
        with self._lock:
            self._timer = None
            if self._closed or self._pending is None:
                return
            pending, self._pending = self._pending, None
            self._last = self.clock()
            self._emit(*pending)

    def _emit(self, fraction: float, message: str) -> None:
        self.sent += 1
        try:
            self._send(fraction, message)
        except (OSError, ValueError):
            pass  # the parent went away: the job's own result will say so

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._pending is not None:
                pending, self._pending = self._pending, None
                self._emit(*pending)


class _PipeCaller:
    def __init__(self, fin: Any, fout: Any, job_id: str) -> None:
        self.fin, self.fout, self.job_id, self.n = fin, fout, job_id, 0

    def call(self, service: str, data: dict[str, Any]) -> dict[str, Any]:
        self.n += 1
        _send(self.fout, {"t": "call", "id": self.job_id, "nid": self.n, "service": service, "input": data})
        msg = _recv(self.fin)
        if msg.get("t") != "nested_reply":
            raise Unavailable(f"worker expected a nested reply, got {msg.get('t')!r}")
        if msg.get("ok"):
            result: dict[str, Any] = msg["result"]
            return result
        err = msg.get("error") or {}
        raise from_code(err.get("code", "error"), err.get("message", "nested call failed"), err.get("field", ""),
                        err.get("details", ""))


def worker_main(directory: str) -> int:
    from ._package import load_service
    from .core import current_caller, current_progress

    # The parent owns this process's lifetime: a SIGTERM or Ctrl-C sent to the whole group
    # must not kill a running job while the agent drains; it ends us by closing stdin.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in ("SIGUSR1", "SIGUSR2"):  # the agent's pause/resume, when sent to its whole group
        if hasattr(signal, sig):
            signal.signal(getattr(signal, sig), signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)  # blocked by the parent across the spawn
    _die_with_parent(int(os.environ.get("MICROSWARM_WORKER_PARENT", "0")))
    _restrict_self()

    fin = os.fdopen(os.dup(0), "rb", buffering=1 << 16)
    fout = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    os.dup2(2, 1)  # stray prints from service code go to stderr, never into the protocol
    sys.stdout = sys.stderr
    try:
        from ._sandbox import verify_installed
        # the files may have been altered since install (by another package's code, or anyone on the
        # machine): check them against the manifest, and the manifest against the digest, first
        verify_installed(Path(directory), os.environ.get("MICROSWARM_PACKAGE_DIGEST", ""))
        manifest = json.loads((Path(directory) / ".manifest.json").read_bytes())
        cls = load_service(Path(directory), manifest)
        service = cls()
    except BaseException as exc:  # report any load failure to the parent, then stop
        _send(fout, {"t": "fatal", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    if os.environ.get("MICROSWARM_LOG_FORMAT") == "json":
        sys.stderr = sys.stdout = _JsonLines(sys.stderr, {"logger": "microswarm.worker", "service": cls.name})
    max_as = int(os.environ.get("MICROSWARM_JOB_MAX_AS", "0") or 0)
    if max_as > 0:  # after loading the service: the limit is for what jobs allocate
        _set_limit("RLIMIT_AS", max_as)
    job_cpu = int(os.environ.get("MICROSWARM_JOB_CPU_S", "0") or 0)
    if job_cpu > 0:
        _set_limit("RLIMIT_CORE", 0)  # SIGXCPU dumps core by default
    _send(fout, {"t": "ready", "service": cls.name, "pid": os.getpid()})
    while True:
        try:
            msg = _recv(fin)
        except EOFError:
            return 0
        if msg.get("t") != "job":
            continue
        job_id = msg["id"]
        if job_cpu > 0:  # RLIMIT_CPU counts the process's whole life: this job may add job_cpu seconds
            _job_cpu_limit(job_cpu)
        if isinstance(sys.stderr, _JsonLines):
            sys.stderr.context["job"] = job_id
        token = current_caller.set(_PipeCaller(fin, fout, job_id))
        progress = ProgressLimiter(_progress_to(fout, job_id))
        ptoken = current_progress.set(progress)
        t0 = time.perf_counter()
        output: bytes | None = None
        try:
            output = _codec.pack(service.run(_codec.unpack(msg["input"])))
            reply = {"t": "result", "id": job_id, "ok": True}
        except MicroError as exc:
            reply = {"t": "result", "id": job_id, "ok": False, "error": exc.to_dict()}
        except MemoryError:
            limit = f" of {max_as / 2**20:.0f} MiB" if max_as else ""
            reply = {"t": "result", "id": job_id, "ok": False, "limit": "memory_limit",
                     "error": {"code": "memory_limit",
                               "message": f"memory_limit: the job ran out of memory (address-space limit{limit})"}}
        except Exception as exc:
            traceback.print_exc()
            error = {"code": "service_error", "message": _scrub(f"{type(exc).__name__}: {exc}", directory)}
            details = service_traceback(exc, directory)
            if details:
                error["details"] = details
            reply = {"t": "result", "id": job_id, "ok": False, "error": error}
        finally:
            current_caller.reset(token)
            current_progress.reset(ptoken)
            progress.close()
        reply["run_ms"] = (time.perf_counter() - t0) * 1000
        _send(fout, reply, output)


def _progress_to(fout: Any, job_id: str) -> Callable[[float, str], None]:
    def send(fraction: float, message: str) -> None:
        _send(fout, {"t": "progress", "id": job_id, "f": fraction, "m": message})
    return send


MAX_DETAILS = 8 * 1024  # bytes of a service_error's details
MAX_FRAMES = 30


def _scrub(text: str, directory: str) -> str:
    """Package paths made relative: the caller learns nothing of where the volunteer keeps them."""
    for d in {os.path.realpath(directory), os.path.abspath(directory)}:
        text = text.replace(d + os.sep, "").replace(d, ".")
    return text


def service_traceback(exc: BaseException, directory: str) -> str:
    """A service's exception as a traceback of its own code: frames in files inside its package
    (named relative to it, with line, function and source line), then the exception's type and
    message. Frames of microswarm and of libraries, absolute paths and the host's name are left out.
    At most MAX_FRAMES frames (the innermost) and MAX_DETAILS bytes."""
    root = os.path.realpath(directory)
    frames = []
    for fs in traceback.extract_tb(exc.__traceback__):
        path = os.path.realpath(fs.filename) if os.path.isabs(fs.filename) else ""
        if not path.startswith(root + os.sep):
            continue
        frame = f'  File "{os.path.relpath(path, root)}", line {fs.lineno}, in {fs.name}'
        if fs.line:
            frame += "\n    " + fs.line.strip()[:200]
        frames.append(frame)
    text = _scrub(str(exc), directory)
    try:
        import socket
        host = socket.gethostname()
    except OSError:
        host = ""
    if len(host) >= 3:
        text = text.replace(host, "<host>")
    text = _ABS_PATH.sub("<path>", text)[:2000]
    last = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    left_out = max(0, len(frames) - MAX_FRAMES)
    frames = frames[left_out:]
    while True:
        head = ["Traceback (most recent call last; the service's own files):"]
        if left_out:
            head.append(f"  ... {left_out} earlier frame{'s' if left_out > 1 else ''} left out")
        out = "\n".join([*head, *frames, last])
        if len(out.encode()) <= MAX_DETAILS or not frames:
            return out.encode()[:MAX_DETAILS].decode(errors="ignore")
        frames.pop(0)
        left_out += 1


_ABS_PATH = re.compile(r"""(?<![\w.~-])/(?:[^\s'"/:,;()\[\]]+/)*[^\s'"/:,;()\[\]]+""")


def _set_limit(name: str, soft: int, hard: int | None = None) -> None:
    try:
        import resource
        res = getattr(resource, name)
        cur_soft, cur_hard = resource.getrlimit(res)
        if hard is None:
            hard = cur_hard
        if cur_hard != resource.RLIM_INFINITY:
            soft = min(soft, cur_hard)
            hard = min(hard, cur_hard)
        resource.setrlimit(res, (soft, hard))
    except (ImportError, AttributeError, ValueError, OSError) as exc:
        print(f"microswarm worker: could not set {name}: {exc}", file=sys.stderr)


def _job_cpu_limit(seconds: int) -> None:
    """RLIMIT_CPU so that this job gets `seconds` of CPU (the limit counts whole seconds of the
    process's life: the job gets N +- 0.5 s). Past it the kernel sends SIGXCPU, which ends the
    worker (the parent reports `cpu_time_limit`)."""
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)
    _set_limit("RLIMIT_CPU", round(ru.ru_utime + ru.ru_stime + seconds))


def _restrict_self() -> None:
    """No new privileges for job code (setuid binaries gain nothing), and the priority the parent asks."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    except (OSError, AttributeError):
        pass
    nice = int(os.environ.get("MICROSWARM_WORKER_NICE", "0") or 0)
    if nice > 0:
        try:
            os.nice(nice)
        except OSError:
            pass


class _JsonLines:
    """stderr of a worker in JSON-log mode: each line a JSON event, like its parent's logs."""

    def __init__(self, stream: Any, context: dict[str, Any]) -> None:
        self.stream, self.context, self._buf = stream, dict(context), ""

    def write(self, text: str) -> int:
        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            if line.strip():
                event = {"ts": time.time(), "level": "info", **self.context, "pid": os.getpid(), "msg": line}
                self.stream.write(json.dumps(event) + "\n")
        self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


# ---------------------------------------------------------------- the parent side

NestedHandler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
ProgressHandler = Callable[[float, str], None]  # a job's progress: (fraction 0..1, message)


class WorkerCrashed(Exception):
    """The worker process died or broke protocol: an agent fault, not the service's answer."""


class LimitExceeded(WorkerCrashed):
    """The job was stopped for breaking a limit (`cpu_time_limit`, `memory_limit`) or handed back
    (`paused`, `owner_busy`): the agent stays up and the coordinator may run the job itself."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


@dataclass
class JobOutcome:
    ok: bool
    output: bytes = b""
    error: dict[str, str] = field(default_factory=dict)
    run_ms: float = 0.0


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel kill this worker when its parent dies, even by SIGKILL.

    Set here rather than in a preexec_fn: running Python between fork and exec in a process
    with gRPC threads is unsafe, and without one the parent can spawn with vfork."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent and os.getppid() != parent:  # the parent died before the prctl took hold
        os._exit(1)


def _widen_pipe(stream: Any) -> None:
    """Linux: 1 MiB pipe buffers instead of 64 KiB, so a large payload crosses in few loop turns."""
    try:
        import fcntl
        transport: Any = getattr(stream, "transport", None) or getattr(stream, "_transport", None)  # None: caught
        fd = transport.get_extra_info("pipe").fileno()
        fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ
    except (OSError, AttributeError, ImportError, ValueError):
        pass


class Worker:
    def __init__(self, directory: Path, env: dict[str, str] | None = None, sandbox: Sandbox | None = None,
                 digest: str = "") -> None:
        self.directory = directory
        self.env = env
        self.sandbox = sandbox
        self.digest = digest
        self.proc: asyncio.subprocess.Process | None = None
        self.host_pid = 0  # the worker's own pid (under bwrap, proc is bwrap and the worker its grandchild)
        self._tmp = ""
        self.network = False
        self.busy = False
        self.stop_reason = ""  # set by stop(): why the parent ended this worker mid-job
        self.idle_since = time.monotonic()
        try:
            m = json.loads((directory / ".manifest.json").read_bytes())
            self.label = f"{m['name']}@{m['version']}"
            self.network = bool((m.get("service") or {}).get("network", False))
        except (OSError, ValueError, KeyError, AttributeError):
            self.label = directory.name

    @property
    def sandboxed(self) -> bool:
        return self.sandbox is not None and self.sandbox.strong

    async def start(self) -> None:
        # a scrubbed environment: the allowlist only (no token, nothing else of the parent's)
        extra = {"MICROSWARM_WORKER_PARENT": str(os.getpid()), "PYTHONDONTWRITEBYTECODE": "1"}
        if self.digest:
            extra["MICROSWARM_PACKAGE_DIGEST"] = self.digest
        if self.sandboxed:
            # under bwrap the worker's parent is the namespace's init; bwrap --die-with-parent ends it
            extra.update(MICROSWARM_WORKER_PARENT="0", **inner_env())
        else:
            import tempfile
            self._tmp = tempfile.mkdtemp(prefix="microswarm-worker-")
            extra.update(HOME=self._tmp, TMPDIR=self._tmp)
        env = worker_env(self.env, extra)
        argv = [sys.executable, "-m", "microcores._worker", str(self.directory)]
        if self.sandbox is not None:
            argv = self.sandbox.wrap(argv, self.directory, self.network)
        # Its own session, and the group's signals blocked across fork and exec (the worker unblocks
        # them once it ignores them): a Ctrl-C, SIGTERM or pause sent to the agent's group must not end
        # a worker that is still starting. It dies with its parent (PDEATHSIG).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, limit=MAX_PIPE_MESSAGE,
                start_new_session=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        for stream in (self.proc.stdin, self.proc.stdout):
            _widen_pipe(stream)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that comes as the worker
            # says ready (gh-86296), and a job cancelled while its worker started ran to its end anyway
            async with asyncio.timeout(START_TIMEOUT):
                msg = await self._recv()
        except (TimeoutError, WorkerCrashed) as exc:
            self.kill()
            raise WorkerCrashed(f"worker for {self.label} did not start: {exc}") from None
        except BaseException:  # its job was cancelled while it loaded: no half-started process left behind
            self.kill()
            raise
        if msg.get("t") != "ready":
            self.kill()
            raise WorkerCrashed(f"worker for {self.label} failed to load: {msg.get('error')}")
        self.host_pid = _grandchild(self.proc.pid) if self.sandboxed else self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def _recv(self) -> dict[str, Any]:
        assert self.proc and self.proc.stdout
        try:
            head = await self.proc.stdout.readexactly(HEADER.size)
            (n,) = HEADER.unpack(head)
            if n > MAX_PIPE_MESSAGE:
                raise WorkerCrashed(f"worker sent a {n}-byte message")
            msg: dict[str, Any] = _codec.unpack(await self.proc.stdout.readexactly(n), limit=MAX_PIPE_MESSAGE)
            size = msg.pop(BLOB, None) if isinstance(msg, dict) else None
            if size is not None:  # a result's output follows its frame, raw (both within MAX_PIPE_MESSAGE)
                if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_PIPE_MESSAGE - n:
                    raise WorkerCrashed(f"worker announced a {size!r}-byte output")
                msg["output"] = await self.proc.stdout.readexactly(size)
            return msg
        except (asyncio.IncompleteReadError, ConnectionError):
            rc = await self._exit_code()
            if self.sandboxed and rc is not None and rc > 128:  # bwrap exits 128+N when its child dies of N
                rc = -(rc - 128)
            if self.stop_reason:
                raise LimitExceeded(self.stop_reason.split(":")[0], self.stop_reason) from None
            if rc == -getattr(signal, "SIGXCPU", -1):
                cpu = (self.env if self.env is not None else os.environ).get("MICROSWARM_JOB_CPU_S", "?")
                raise LimitExceeded("cpu_time_limit", f"cpu_time_limit: the job used up its CPU time ({cpu} s "
                                    "of RLIMIT_CPU); its worker was stopped") from None
            raise WorkerCrashed(f"worker process exited ({describe_exit(rc)})") from None
        except MicroError as exc:
            raise WorkerCrashed(f"worker broke protocol: {exc}") from None

    async def _exit_code(self) -> int | None:
        assert self.proc
        try:
            return await asyncio.wait_for(self.proc.wait(), 2.0)
        except asyncio.TimeoutError:
            return None

    def _send(self, msg: dict[str, Any]) -> None:
        assert self.proc and self.proc.stdin
        data = _codec.pack(msg)
        if len(data) < 65536:  # one write (one syscall) for small messages; no copy of large ones
            self.proc.stdin.write(HEADER.pack(len(data)) + data)
        else:
            self.proc.stdin.write(HEADER.pack(len(data)))
            self.proc.stdin.write(data)

    async def _send_job(self, job_id: str, input_bytes: bytes) -> None:
        """The job's frame, then its input raw (see BLOB), in pieces the pipe takes as they come: what
        the pipe cannot take at once is all the transport buffers (a copy of at most one piece), not
        the rest of the input."""
        assert self.proc and self.proc.stdin
        stdin = self.proc.stdin
        data = _codec.pack({"t": "job", "id": job_id, BLOB: len(input_bytes)})
        stdin.write(HEADER.pack(len(data)) + data)
        view = memoryview(input_bytes)
        for off in range(0, len(view), PIPE_PIECE):
            stdin.write(view[off:off + PIPE_PIECE])
            await stdin.drain()
        await stdin.drain()

    async def run(self, job_id: str, input_bytes: bytes, timeout_s: float, nested: NestedHandler,
                  on_progress: ProgressHandler | None = None) -> JobOutcome:
        """Run one job; raises DeadlineExceeded (worker killed) or WorkerCrashed."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._send_job(job_id, input_bytes)
                assert self.proc and self.proc.stdin
                while True:
                    msg = await self._recv()
                    kind = msg.get("t")
                    if kind == "result":
                        if msg.get("limit"):
                            err = msg.get("error") or {}
                            raise LimitExceeded(str(msg["limit"]), str(err.get("message", msg["limit"])))
                        return JobOutcome(bool(msg.get("ok")), msg.get("output", b""), msg.get("error") or {},
                                          float(msg.get("run_ms", 0.0)))
                    if kind == "progress":
                        if on_progress is not None and msg.get("id") == job_id:
                            from .core import clean_progress
                            on_progress(*clean_progress(msg.get("f"), msg.get("m")))
                        continue
                    if kind == "call":
                        try:
                            result = await nested(str(msg.get("service", "")), msg.get("input") or {})
                            reply = {"t": "nested_reply", "nid": msg.get("nid"), "ok": True, "result": result}
                        except MicroError as exc:
                            reply = {"t": "nested_reply", "nid": msg.get("nid"), "ok": False,
                                     "error": exc.to_dict()}
                        self._send(reply)
                        await self.proc.stdin.drain()
        except (ConnectionError, BrokenPipeError):
            self.kill()
            raise WorkerCrashed("worker process went away") from None
        except TimeoutError:
            self.kill()
            raise DeadlineExceeded(f"job {job_id} ran past its {timeout_s:.1f} s deadline; "
                                   "its worker was stopped") from None

    def kill(self) -> None:
        if self.proc and self.proc.returncode is None:
            if self.host_pid and self.host_pid != self.proc.pid:
                try:  # SIGKILL the worker itself too: it may be held by SIGSTOP (a CPU throttle)
                    os.kill(self.host_pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        self._cleanup()

    def _cleanup(self) -> None:
        if self._tmp:
            import shutil
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = ""

    def stop(self, reason: str) -> None:
        """End this worker mid-job; its job fails with LimitExceeded(reason's first word)."""
        self.stop_reason = reason
        self.kill()

    @property
    def pid(self) -> int:
        """The worker process's pid (the one to throttle, signal and measure)."""
        return self.host_pid or (self.proc.pid if self.proc is not None else 0)

    async def close(self) -> None:
        if self.proc and self.proc.returncode is None:
            try:
                os.kill(self.pid, signal.SIGCONT)  # it may be held by a CPU throttle
            except (ProcessLookupError, PermissionError):
                pass
            try:
                assert self.proc.stdin
                self.proc.stdin.close()
                await asyncio.wait_for(self.proc.wait(), 3.0)
            except (asyncio.TimeoutError, ConnectionError, AssertionError):
                self.kill()
                await self._exit_code()
        self._cleanup()


def _grandchild(pid: int) -> int:
    """The pid of the process under bwrap's namespace init (bwrap -> init -> worker), found by ppid."""
    def children(of: int) -> list[int]:
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat", "rb") as f:
                        stat = f.read()
                except OSError:
                    continue
                if int(stat[stat.rindex(b")") + 2:].split()[1]) == of:
                    out.append(int(name))
        return out
    try:
        for init in children(pid):
            kids = children(init)
            if kids:
                return kids[0]
    except (OSError, ValueError, IndexError):
        pass
    return pid


def describe_exit(rc: int | None) -> str:
    if rc is None:
        return "still running"
    if rc < 0:
        import signal
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


class WorkerPool:
    """Up to `size` workers for one package version; idle ones are reused."""

    def __init__(self, directory: Path, size: int, env: dict[str, str] | None = None,
                 sandbox: Sandbox | None = None, digest: str = "") -> None:
        self.directory = directory
        self.size = max(1, size)
        self.env = env
        self.sandbox = sandbox  # None: no namespaces (the environment is scrubbed all the same)
        self.digest = digest    # the package's digest: its installed files are checked against it
        self._idle: list[Worker] = []
        self.busy: set[Worker] = set()  # workers running a job now
        self._count = 0
        self._sem = asyncio.Semaphore(self.size)
        self._closed = False

    async def warm(self) -> None:
        if not self._idle and self._count == 0:
            w = await self._spawn()
            self._idle.append(w)

    async def _spawn(self) -> Worker:
        self._count += 1
        try:
            w = Worker(self.directory, self.env, self.sandbox, self.digest)
            await w.start()
            return w
        except BaseException:
            self._count -= 1
            raise

    async def run(self, job_id: str, input_bytes: bytes, timeout_s: float, nested: NestedHandler,
                  on_start: Callable[[], Awaitable[bool]] | None = None,
                  on_progress: ProgressHandler | None = None) -> JobOutcome | None:
        """`on_start` is awaited once a worker is ready for the job (until then it only waited for a
        slot); if it says no, the job does not run (None) and the worker stays for the next."""
        if self._closed:
            raise WorkerCrashed("package was replaced or removed")
        async with self._sem:
            w = self._idle.pop() if self._idle else await self._spawn()
            ok = False
            self.busy.add(w)
            try:
                if on_start is not None:
                    try:
                        go = await on_start()
                    except BaseException:
                        ok = True  # the worker never got the job: it stays for the next
                        raise
                    if not go:
                        ok = True
                        return None
                outcome = await w.run(job_id, input_bytes, timeout_s, nested, on_progress)
                ok = True
                return outcome
            finally:
                self.busy.discard(w)
                if ok and w.alive and not self._closed:
                    w.idle_since = time.monotonic()
                    self._idle.append(w)
                else:
                    self._count -= 1
                    if ok:
                        await w.close()  # the pool closed meanwhile: let it exit
                    else:
                        w.kill()  # crashed or overran: its state is unknown

    def workers(self) -> list[Worker]:
        return [*self._idle, *self.busy]

    async def reap(self, idle_s: float) -> int:
        """Stop workers that sat idle `idle_s` or longer: a package in use keeps its processes, one
        that is not costs none (the next job starts a worker again)."""
        now = time.monotonic()
        old = [w for w in self._idle if now - w.idle_since >= idle_s]
        if not old:
            return 0
        self._idle = [w for w in self._idle if w not in old]
        self._count -= len(old)
        await asyncio.gather(*(w.close() for w in old), return_exceptions=True)
        return len(old)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(w.close() for w in idle), return_exceptions=True)
        self._count -= len(idle)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
