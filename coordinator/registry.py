"""The service registry (the paper's MicroContainer): which services exist, at which version.

Each published version is a signed package stored in the state directory; the newest revision
of a name is the one calls use. The coordinator loads each package's classes in-process, under
a namespace of their own, for their input and output models; `process()` itself only ever runs
in worker processes (on agents, or in the coordinator's fallback pool).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from microcores import _publisher
from microcores import services as builtin_services
from microcores._package import Package, build, load_service, parse_manifest, sign
from microcores.core import NAME_RE, MicroCore
from microcores.errors import PackageError, UnknownService
from microswarm.protos import microswarm_pb2 as pb

from .state import StateDir

log = logging.getLogger("microswarm.registry")


@dataclass
class ServiceEntry:
    cls: type[MicroCore[Any, Any]]
    package: Package
    revision: int
    builtin: bool
    published_at: float

    @property
    def name(self) -> str:
        return self.cls.name

    @property
    def version(self) -> str:
        return str(self.cls.version)

    @property
    def digest(self) -> str:
        return self.package.digest

    @property
    def ref(self) -> pb.PackageRef:
        return pb.PackageRef(name=self.name, version=self.version, digest=self.digest,
                             size=len(self.package.archive))

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


class Registry:
    def __init__(self, state: StateDir, publisher_keys: list[bytes] | None = None) -> None:
        self.state = state
        # --publisher-key: only packages one of these signed are published (and restored); the
        # coordinator relays the signature, which agents whose token carries the keys check too
        self.publisher_keys = list(publisher_keys or [])
        self.services: dict[str, ServiceEntry] = {}
        self.by_digest: dict[str, ServiceEntry] = {}
        self._published: list[dict[str, Any]] = []
        self.listeners: list[Callable[[ServiceEntry], None]] = []
        self.taken: Callable[[str], bool] = lambda name: False  # names held by something else (a route)

    def load(self) -> None:
        """Built-ins first, then what the operator published (which may replace a built-in)."""
        for cls in builtin_services.BUILTINS:
            pkg = sign(build(cls), self.state.identity)
            self.state.store_package(pkg)
            self._add(ServiceEntry(cls, pkg, 1, True, time.time()))
        self._published = self.state.read_registry()
        for rec in self._published:
            try:
                pkg = self.state.load_package(rec["digest"])
                self._check_publisher(pkg)
                cls = self._load_class(pkg)
                self._add(ServiceEntry(cls, pkg, int(rec["revision"]), False, float(rec["published_at"])))
            except (OSError, PackageError, KeyError, ValueError, ImportError) as exc:
                log.error("could not restore published package %s (%s): %s", rec.get("name"),
                          rec.get("digest", "?")[:12], exc)

    def reload(self) -> list[str]:
        """Re-read registry.json (SIGHUP): records new to this process are loaded, records gone
        from the file are unpublished (a built-in they replaced comes back). Returns the names
        whose current version changed."""
        before = {n: e.digest for n, e in self.services.items()}
        records = self.state.read_registry()
        keep = {d: e for d, e in self.by_digest.items() if e.builtin}
        old = self.by_digest
        self.services, self.by_digest = {}, {}
        for e in keep.values():
            self._add(e)
        for rec in records:
            try:
                entry = old.get(rec["digest"])
                if entry is None or entry.builtin:
                    pkg = self.state.load_package(rec["digest"])
                    self._check_publisher(pkg)
                    entry = ServiceEntry(self._load_class(pkg), pkg, int(rec["revision"]), False,
                                         float(rec["published_at"]))
                    log.info("reload: %s revision %d (digest %s) is new", entry.label, entry.revision,
                             entry.digest[:12])
                self._add(entry)
            except (OSError, PackageError, KeyError, ValueError, ImportError) as exc:
                log.error("reload: could not load published package %s (%s): %s", rec.get("name"),
                          str(rec.get("digest", "?"))[:12], exc)
        self._published = records
        after = {n: e.digest for n, e in self.services.items()}
        return sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))

    def _load_class(self, pkg: Package) -> type[MicroCore[Any, Any]]:
        d = self.state.store_package(pkg)
        return load_service(d / "files", pkg.info, namespace=f"_msw_{pkg.digest[:16]}")

    def _add(self, entry: ServiceEntry) -> None:
        self.by_digest[entry.digest] = entry
        cur = self.services.get(entry.name)
        if cur is None or entry.revision >= cur.revision:
            self.services[entry.name] = entry

    def _check_publisher(self, pkg: Package) -> None:
        if self.publisher_keys:
            _publisher.verify(pkg.manifest, pkg.publisher_signature, self.publisher_keys,
                              f"package {pkg.name} ({pkg.digest[:12]})")

    def publish(self, manifest: bytes, archive: bytes, publisher_signature: bytes = b""
                ) -> tuple[ServiceEntry, bool]:
        """Check, sign, store and load a package from the operator; it becomes the current version."""
        info = parse_manifest(manifest)
        name = info["name"]
        if not NAME_RE.match(name):
            raise PackageError(f"service name {name!r} must look like 'group.function'")
        if self.taken(name):
            raise PackageError(f"{name} is a route to an existing web service (`microswarm routes list`): "
                               "remove the route first (`microswarm routes remove NAME`), or give the service "
                               "another name")
        if self.publisher_keys:
            _publisher.verify(manifest, publisher_signature, self.publisher_keys, f"package {name}")
        else:
            publisher_signature = b""  # nobody checks it: do not store what was not verified
        unsigned = Package(manifest, archive, b"", publisher_signature)
        cur = self.services.get(name)
        if cur is not None and cur.digest == unsigned.digest:
            if publisher_signature and cur.package.publisher_signature != publisher_signature:
                cur.package = sign(unsigned, self.state.identity)  # now relayed with its publisher's signature
                self.state.store_publisher_signature(cur.package)
            return cur, True
        pkg = sign(unsigned, self.state.identity)
        try:
            cls = self._load_class(pkg)
        except PackageError:
            raise
        except Exception as exc:
            raise PackageError(f"package {name} does not load: {type(exc).__name__}: {exc}") from None
        entry = ServiceEntry(cls, pkg, (cur.revision + 1) if cur else 1, False, time.time())
        record = {"name": name, "version": entry.version, "digest": entry.digest, "revision": entry.revision,
                  "published_at": entry.published_at}
        self.state.add_published(self._published, record, pkg)  # stored first: on failure nothing changed
        self._published.append(record)
        self._add(entry)
        log.info("published %s revision %d (digest %s)", entry.label, entry.revision, entry.digest[:12])
        for listener in self.listeners:
            listener(entry)
        return entry, False

    def get(self, name: str) -> ServiceEntry:
        entry = self.services.get(name)
        if entry is None:
            known = ", ".join(sorted(self.services)[:20])
            raise UnknownService(f"no service named {name!r}; known services: {known}")
        return entry

    def current(self) -> list[ServiceEntry]:
        return sorted(self.services.values(), key=lambda e: e.name)
