"""Code packages: a zip of a service's code plus a manifest, signed by the coordinator.

The manifest names the service, its version and entry point, and the sha256 of every file.
Its own sha256 is the package's digest, which is what agents are told to hold and what the
result cache keys on. Agents verify the signature with the key pinned by their token, then the
archive's hash, then extract with zip-slip and zip-bomb defences and check every file's hash.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import shutil
import stat
import sys
import tempfile
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .core import MicroCore
from .errors import PackageError

FORMAT = 1
MAX_FILES = 2000
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_TOTAL_BYTES = 256 * 1024 * 1024
MAX_ARCHIVE_BYTES = 128 * 1024 * 1024
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_RATIO = 200  # uncompressed : compressed, per file, beyond a small floor
PICKLE_ENTRY = "service.pkl"
SIGN_LABEL = b"microswarm-package\0"
BUILTIN_MODULE = "microswarm_builtins"


@dataclass(frozen=True)
class Package:
    manifest: bytes
    archive: bytes
    signature: bytes = b""
    publisher_signature: bytes = b""  # by a publisher's key, made off the coordinator (_publisher.py)

    @functools.cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.manifest).hexdigest()

    @functools.cached_property
    def info(self) -> dict[str, Any]:
        return parse_manifest(self.manifest)

    @property
    def name(self) -> str:
        name: str = self.info["name"]
        return name

    @property
    def version(self) -> str:
        version: str = self.info["version"]
        return version


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- building

def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, files[name])
    return buf.getvalue()


def build(cls: type[MicroCore[Any, Any]], *, source_override: dict[str, bytes] | None = None,
          entry_module: str | None = None) -> Package:
    """Package one service class: its module's source, or the class by value when it has none."""
    module = sys.modules.get(cls.__module__)
    files: dict[str, bytes]
    entry: dict[str, str]
    if source_override is not None:
        files, entry = dict(source_override), {"module": entry_module or "", "class": cls.__qualname__}
    elif module is None or cls.__module__ == "__main__" or not getattr(module, "__file__", None):
        import cloudpickle  # classes from __main__ or a notebook travel by value
        if module is not None:
            cloudpickle.register_pickle_by_value(module)
        try:
            files = {PICKLE_ENTRY: cloudpickle.dumps(cls)}
        finally:
            if module is not None:
                try:
                    cloudpickle.unregister_pickle_by_value(module)
                except ValueError:
                    pass
        entry = {"pickle": PICKLE_ENTRY, "class": cls.__qualname__}
    else:
        files, modname = module_files(module)
        entry = {"module": modname, "class": cls.__qualname__}
    return build_from_files(cls, files, entry)


def build_from_files(cls: type[MicroCore[Any, Any]], files: dict[str, bytes], entry: dict[str, str]) -> Package:
    archive = _zip(files)
    manifest = {
        "format": FORMAT,
        "name": cls.name,
        "version": str(cls.version),
        "entry": entry,
        "files": {n: sha256(b) for n, b in sorted(files.items())},
        "archive_sha256": sha256(archive),
        "service": cls.describe(),
    }
    return Package(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode(), archive)


def module_files(module: types.ModuleType) -> tuple[dict[str, bytes], str]:
    """The files to ship for a module: the file itself, or its whole top-level package."""
    path = Path(module.__file__).resolve()  # type: ignore[arg-type]
    top = module.__name__.split(".")[0]
    if module.__name__.startswith("microcores."):
        # Built-in services ship as a standalone module: agents may run another SDK release.
        return {f"{BUILTIN_MODULE}.py": path.read_bytes()}, BUILTIN_MODULE
    if "." not in module.__name__ and path.name != "__init__.py":
        return {f"{module.__name__}.py": path.read_bytes()}, module.__name__
    root = Path(sys.modules[top].__file__).resolve().parent  # type: ignore[arg-type]
    files: dict[str, bytes] = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or not p.is_file() or "__pycache__" in p.parts or p.suffix in (".pyc", ".pyo"):
            continue
        rel = p.relative_to(root.parent).as_posix()
        files[rel] = p.read_bytes()
        if len(files) > MAX_FILES:
            raise PackageError(f"package {top} has more than {MAX_FILES} files")
    return files, module.__name__


def sign(pkg: Package, key: Ed25519PrivateKey) -> Package:
    return Package(pkg.manifest, pkg.archive, key.sign(SIGN_LABEL + pkg.manifest), pkg.publisher_signature)


# ---------------------------------------------------------------- checking

def parse_manifest(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MANIFEST_BYTES:
        raise PackageError(f"manifest of {len(data)} bytes exceeds {MAX_MANIFEST_BYTES}")
    try:
        m = json.loads(data)
    except ValueError as exc:
        raise PackageError(f"manifest is not JSON: {exc}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise PackageError(f"manifest format {m.get('format') if isinstance(m, dict) else '?'} "
                           f"is not supported (expected {FORMAT})")
    for key, kind in (("name", str), ("version", str), ("entry", dict), ("files", dict),
                      ("archive_sha256", str), ("service", dict)):
        if not isinstance(m.get(key), kind):
            raise PackageError(f"manifest field {key!r} is missing or not a {kind.__name__}")
    return m


def verify_signature(pkg: Package, public_key: bytes) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(pkg.signature, SIGN_LABEL + pkg.manifest)
    except (InvalidSignature, ValueError):
        raise PackageError("package signature does not verify against the coordinator's key") from None


def check_member_name(name: str) -> None:
    """Refuse absolute paths, parent references, drive letters and odd characters."""
    if not name or "\\" in name or "\0" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise PackageError(f"unsafe path in package: {name!r} (absolute or malformed)")
    parts = name.split("/")
    if any(p in ("..", ".", "") for p in parts):
        raise PackageError(f"unsafe path in package: {name!r} (contains '..' or an empty part)")
    if len(name) > 400:
        raise PackageError(f"path in package too long: {name[:60]!r}...")


def extract(pkg: Package, dest: Path) -> dict[str, Any]:
    """Check the archive against the manifest and extract it into `dest` (made atomically)."""
    m = parse_manifest(pkg.manifest)
    if len(pkg.archive) > MAX_ARCHIVE_BYTES:
        raise PackageError(f"archive of {len(pkg.archive)} bytes exceeds {MAX_ARCHIVE_BYTES}")
    if sha256(pkg.archive) != m["archive_sha256"]:
        raise PackageError("archive sha256 does not match the manifest")
    expected: dict[str, str] = m["files"]
    if len(expected) > MAX_FILES:
        raise PackageError(f"package lists {len(expected)} files, more than {MAX_FILES}")
    for name in expected:
        check_member_name(name)
    try:
        zf = zipfile.ZipFile(io.BytesIO(pkg.archive))
    except zipfile.BadZipFile as exc:
        raise PackageError(f"archive is not a zip: {exc}") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        seen: set[str] = set()
        total = 0
        infos = zf.infolist()
        if len(infos) > MAX_FILES:
            raise PackageError(f"archive has {len(infos)} entries, more than {MAX_FILES}")
        for info in infos:
            name = info.filename
            check_member_name(name)
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if info.is_dir() or (kind and kind != stat.S_IFREG):
                raise PackageError(f"package entry {name!r} is not a regular file (links and "
                                   "directories are refused)")
            if name in seen:
                raise PackageError(f"package entry {name!r} appears twice")
            if name not in expected:
                raise PackageError(f"package entry {name!r} is not listed in the manifest")
            seen.add(name)
            if info.file_size > MAX_FILE_BYTES or (
                    info.file_size > 1 << 20 and info.file_size > MAX_RATIO * max(1, info.compress_size)):
                raise PackageError(f"package entry {name!r} is too large or too compressed "
                                   f"({info.file_size} bytes from {info.compress_size})")
            h = hashlib.sha256()
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 16):
                    total += len(chunk)
                    if total > MAX_TOTAL_BYTES or out.tell() + len(chunk) > MAX_FILE_BYTES:
                        raise PackageError(f"package expands beyond its size limit at {name!r}")
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != expected[name]:
                raise PackageError(f"package entry {name!r} does not match its sha256 in the manifest")
        missing = set(expected) - seen
        if missing:
            raise PackageError(f"package lacks files its manifest lists: {sorted(missing)[:5]}")
        (tmp / ".manifest.json").write_bytes(pkg.manifest)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process extracted the same digest
        return m
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- loading

def load_service(directory: Path, manifest: dict[str, Any], *, namespace: str | None = None
                 ) -> type[MicroCore[Any, Any]]:
    """Import the service class from an extracted package.

    In a worker (one package per process) the package directory goes on sys.path. In the
    coordinator, which holds many packages and versions at once, `namespace` keeps each
    package's modules apart under a synthetic parent package.
    """
    entry = manifest["entry"]
    if "pickle" in entry:
        import cloudpickle  # signed by the coordinator: trusted code, like a module
        cls = cloudpickle.loads((directory / entry["pickle"]).read_bytes())
    else:
        modname = entry["module"]
        if namespace:
            parent = types.ModuleType(namespace)
            parent.__path__ = [str(directory)]
            sys.modules[namespace] = parent
            module = importlib.import_module(f"{namespace}.{modname}")
        else:
            if str(directory) not in sys.path:
                sys.path.insert(0, str(directory))
            module = importlib.import_module(modname)
        cls = module
        for part in entry["class"].split("."):
            cls = getattr(cls, part)
    if not (inspect.isclass(cls) and issubclass(cls, MicroCore)):
        raise PackageError(f"entry {entry} of package {manifest['name']} is not a MicroCore subclass")
    if cls.name != manifest["name"]:
        raise PackageError(f"package {manifest['name']} holds service {cls.name}")
    return cls


def services_in(module: types.ModuleType) -> list[type[MicroCore[Any, Any]]]:
    """Every concrete MicroCore subclass defined in a module (what `publish PATH` ships)."""
    found = []
    for obj in vars(module).values():
        if (inspect.isclass(obj) and issubclass(obj, MicroCore) and obj.__dict__.get("name")
                and obj.__module__ == module.__name__):
            found.append(obj)
    return found


def import_path(path: Path) -> list[types.ModuleType]:
    """Import a file, or every module of a package directory, for publishing."""
    path = path.resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        if path.suffix != ".py":
            raise ValueError(f"{path} is not a Python file")
        name = path.stem
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)  # not half a module left behind under its name
            raise
        return [module]
    if not (path / "__init__.py").exists():
        raise ValueError(f"{path} is a directory but not a Python package (no __init__.py)")
    sys.path.insert(0, str(path.parent))
    modules = []
    for p in sorted(path.rglob("*.py")):
        rel = p.relative_to(path.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules.append(importlib.import_module(".".join(parts)))
    return modules
