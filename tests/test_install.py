"""A clean install: the wheel, installed into a fresh virtual environment, runs the demo from
another directory (one with a `protos/` folder of its own, as gRPC projects have), answers
`python -m microswarm --version`, carries the .proto file and the examples, and puts nothing
generic (protos, coordinator, agent) at the top of site-packages."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only the built wheel in it; third-party dependencies come from this
    environment's site-packages through a .pth file (no network needed)."""
    tmp = tmp_path_factory.mktemp("install")
    # from a copy of the source: a build/ left in the checkout (setuptools reuses it) must not leak in
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp / "dist").glob("microswarm-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    inst = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-2000:]
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz_microswarm_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def test_nothing_generic_at_the_top_and_the_contract_is_there(installed):
    site = site_packages(installed)
    top = {p.name for p in site.iterdir() if p.is_dir() and not p.name.endswith((".dist-info", "__pycache__"))}
    assert {"microswarm", "microcores"} <= top
    assert not top & {"protos", "coordinator", "agent"}, top
    assert (site / "microswarm" / "protos" / "microswarm.proto").is_file()
    assert (site / "microswarm" / "examples" / "square_sum.py").is_file()
    assert (site / "microswarm" / "coordinator" / "static").is_dir()


def test_the_installed_demo_runs_from_another_directory(installed, tmp_path):
    work = tmp_path / "project"
    (work / "protos").mkdir(parents=True)  # a gRPC project's own protos package, first on sys.path
    (work / "protos" / "__init__.py").write_text("raise ImportError('the project protos, not microswarm')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MICROSWARM_", "PYTHONPATH"))}
    env.update(MICROSWARM_SANDBOX="off", HOME=str(tmp_path), COLUMNS="120")
    bin_ = installed / "bin"
    r = subprocess.run([str(bin_ / "python"), "-m", "microswarm", "--version"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("microswarm "), r.stderr
    r = subprocess.run([str(bin_ / "python"), "-c", "from microcores import Client, MicroCore; print('ok')"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    r = subprocess.run([str(bin_ / "microswarm"), "demo"], cwd=work, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "examples.square_sum" in r.stdout + r.stderr
