"""The packages an agent holds: verified against the key its token pins (and, with an msw2 token, a
publisher key it carries), extracted with zip-slip and zip-bomb defences, and run in a worker pool
per version. The coordinator's placement says
which to hold (Holdings); a pool's workers start when the package is first used and stop when idle.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Callable, Protocol

from microcores import _publisher
from microcores._package import Package, extract, verify_signature
from microcores._sandbox import Sandbox
from microcores._worker import WorkerCrashed, WorkerPool
from microcores.errors import MicroError, PackageError
from microswarm.protos import microswarm_pb2 as pb

log = logging.getLogger("microswarm.agent")


class Sender(Protocol):
    coordinator_key: bytes

    def send(self, msg: pb.ToCoordinator) -> None: ...


class PackageStore:
    def __init__(self, directory: Path, slots: int, max_packages: int, worker_idle_s: float,
                 worker_env: Callable[[], dict[str, str] | None]) -> None:
        self.packages_dir = directory
        self.slots = slots
        self.max_packages = max_packages      # 0: no limit
        self.worker_idle_s = worker_idle_s    # 0: workers never stop for being idle
        self.worker_env = worker_env          # the volunteer's limits, for each new pool
        self.pools: dict[str, WorkerPool] = {}
        self.wanted: set[str] = set()
        self.sandbox: Sandbox | None = None  # set by the agent: how its job workers are confined
        # From an msw2 join token: every package must be signed by one of these (or be the built-ins as
        # this install builds them); the coordinator's own signature is then not enough (_publisher.py)
        self.publisher_keys: tuple[bytes, ...] = ()

    async def reap_idle(self) -> None:
        """Workers start when a package is used and stop after `worker_idle_s` idle."""
        if self.worker_idle_s <= 0:
            return
        while True:
            await asyncio.sleep(min(1.0, self.worker_idle_s / 2))
            for digest, pool in list(self.pools.items()):
                n = await pool.reap(self.worker_idle_s)
                if n:
                    log.debug("stopped %d idle worker(s) of package %s", n, digest[:12])

    async def sync(self, link: Sender, refs: list[pb.PackageRef]) -> None:
        if self.max_packages and len(refs) > self.max_packages:
            for r in refs[self.max_packages:]:
                link.send(pb.ToCoordinator(installed=pb.Installed(ref=r, ok=False, error=(
                    f"this agent holds at most {self.max_packages} packages (--max-packages)"))))
            refs = refs[:self.max_packages]
        self.wanted = {r.digest for r in refs}
        for r in refs:
            if r.digest in self.pools:
                link.send(pb.ToCoordinator(installed=pb.Installed(ref=r, ok=True)))
            elif (self.packages_dir / r.digest / ".manifest.json").exists() and self._publisher_ok(r.digest):
                await self._activate(link, r)
            else:
                link.send(pb.ToCoordinator(fetch=pb.Fetch(ref=r)))
        for digest in [d for d in self.pools if d not in self.wanted]:
            pool = self.pools.pop(digest)
            await pool.close()  # busy workers finish their job, then stop
            log.info("retired package %s", digest[:12])

    async def install(self, link: Sender, data: pb.PackageData) -> None:
        ref = data.ref
        try:
            pkg = Package(bytes(data.manifest), bytes(data.archive), bytes(data.signature),
                          bytes(data.publisher_signature))
            if pkg.digest != ref.digest:
                raise PackageError(f"package {ref.name} digest {pkg.digest[:12]} is not the announced "
                                   f"{ref.digest[:12]}")
            verify_signature(pkg, link.coordinator_key)
            if self.publisher_keys:  # before extracting: a coordinator's signature alone is not enough
                signer = _publisher.check_package(pkg, self.publisher_keys)
                log.info("package %s@%s is signed by %s", ref.name, ref.version, signer)
            dest = self.packages_dir / ref.digest
            if not (dest / ".manifest.json").exists():
                await asyncio.get_running_loop().run_in_executor(None, extract, pkg, dest)
            if self.publisher_keys:
                self._publisher_path(ref.digest).write_bytes(pkg.publisher_signature)
            await self._activate(link, ref)
        except (MicroError, OSError) as exc:
            msg = exc.message if isinstance(exc, MicroError) else str(exc)
            log.error("refused package %s@%s: %s", ref.name, ref.version, msg)
            link.send(pb.ToCoordinator(installed=pb.Installed(ref=ref, ok=False, error=msg)))

    def _publisher_path(self, digest: str) -> Path:
        return self.packages_dir / f".{digest}.publisher-sig"

    def _publisher_ok(self, digest: str) -> bool:
        """Whether a package extracted here earlier (maybe under a token without publisher keys) passes
        this token's publisher check; if not it is fetched again, and checked when it comes."""
        if not self.publisher_keys:
            return True
        try:
            sig = self._publisher_path(digest).read_bytes() if self._publisher_path(digest).exists() else b""
            manifest = (self.packages_dir / digest / ".manifest.json").read_bytes()
            pkg = Package(manifest, b"", b"", sig)
            if pkg.digest != digest:
                return False
            _publisher.check_package(pkg, self.publisher_keys)
            return True
        except (OSError, MicroError):
            return False

    async def _activate(self, link: Sender, ref: pb.PackageRef) -> None:
        if ref.digest not in self.pools:
            pool = WorkerPool(self.packages_dir / ref.digest, self.slots, env=self.worker_env(),
                              sandbox=self.sandbox, digest=ref.digest)
            try:
                await pool.warm()  # shows the package loads here; the worker then waits for a first job
            except WorkerCrashed as exc:
                link.send(pb.ToCoordinator(installed=pb.Installed(ref=ref, ok=False, error=str(exc))))
                return
            if ref.digest not in self.wanted:  # dropped by newer holdings while it was installing
                await pool.close()
                return
            self.pools[ref.digest] = pool
            if self.worker_idle_s > 0:
                await pool.reap(0.0)  # workers start when the package is first used, not all at join
        log.info("installed %s@%s (%s)", ref.name, ref.version, ref.digest[:12])
        link.send(pb.ToCoordinator(installed=pb.Installed(ref=ref, ok=True)))
