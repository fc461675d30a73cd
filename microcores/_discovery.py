"""LAN discovery with zeroconf (mDNS/DNS-SD), shared by both daemons.

The coordinator advertises `_microswarm._tcp.local.` with its gRPC port; the TXT record carries
the sha256 fingerprint of its Ed25519 key (`fp`, hex), its protocol version and id. An agent
started with `--discover` browses for that type and keeps the advertisements whose `fp` equals
the fingerprint pinned by its join token. The TXT record is only a hint for picking among
coordinators: anyone on the LAN can advertise anything, so trust is still decided by the
handshake, where the coordinator must prove it holds the pinned key. A spoofed advertisement
leads the agent to a coordinator that fails that check (`coordinator_key_mismatch`), or that
refuses it without the pinned key's signature: the agent skips that address (trying it last for
a while, and listening longer for the real answer: `browse(settle=...)`) and goes on looking.
It never stops for an advertisement.

Interfaces: an advertiser for a specific listen address advertises on that address's interface
only; one for a wildcard listen (0.0.0.0, [::]) on every interface. `MICROSWARM_DISCOVERY_INTERFACES`
(comma-separated IP addresses) narrows both sides to the given interfaces.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("microswarm.discovery")

SERVICE_TYPE = "_microswarm._tcp.local."
TXT_VERSION = "1"


@dataclass
class Advertisement:
    """One coordinator found on the LAN."""

    name: str
    addresses: list[str]
    port: int
    fingerprint: str          # hex sha256 of the coordinator's key, as advertised (unverified)
    coordinator_id: str = ""
    protocol: str = ""
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        """HOST:PORT for each advertised address, IPv4 first."""
        out = []
        for a in sorted(self.addresses, key=lambda a: ":" in a):
            out.append(f"[{a}]:{self.port}" if ":" in a else f"{a}:{self.port}")
        return out


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    return host, int(port or 0)


def is_loopback(host: str, resolve: bool = True) -> bool:
    """`resolve=False`: a name other than localhost is not looked up (no blocking DNS; not loopback)."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        if not resolve:
            return False
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def _env_interfaces() -> list[str] | None:
    raw = os.environ.get("MICROSWARM_DISCOVERY_INTERFACES", "").strip()
    return [x.strip() for x in raw.split(",") if x.strip()] or None


def _machine_addresses(include_loopback: bool = False) -> list[str]:
    """The IPv4 addresses of this machine's interfaces (non-loopback unless asked)."""
    import psutil

    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET:
                ip = ipaddress.ip_address(a.address)
                if include_loopback or not ip.is_loopback:
                    out.append(a.address)
    return sorted(set(out))


def _zeroconf_args(interfaces: list[str] | None) -> dict[str, Any]:
    from zeroconf import InterfaceChoice, IPVersion

    if not interfaces:
        return {"interfaces": InterfaceChoice.All, "ip_version": IPVersion.V4Only}
    v6 = any(":" in i for i in interfaces)
    v4 = any(":" not in i for i in interfaces)
    version = IPVersion.All if v4 and v6 else (IPVersion.V6Only if v6 else IPVersion.V4Only)
    return {"interfaces": interfaces, "ip_version": version}


def should_advertise(listen: str, advertise: bool | None) -> bool:
    """Default: advertise unless the coordinator listens on loopback only (nobody else could dial it)."""
    if advertise is not None:
        return advertise
    host, _ = split_listen(listen)
    return not is_loopback(host)


class Advertiser:
    """Registers the coordinator's service record; `start()` returns at once, probing goes on."""

    def __init__(self, listen: str, port: int, fingerprint_hex: str, coordinator_id: str,
                 protocol: int, instance: str | None = None) -> None:
        host, _ = split_listen(listen)
        self.port = port
        self.fingerprint = fingerprint_hex
        wildcard = host in ("", "0.0.0.0", "::")
        env = _env_interfaces()
        if env:
            self.interfaces: list[str] | None = env
            self.addresses = env
        elif wildcard:
            self.interfaces = None  # every interface
            self.addresses = _machine_addresses()
        else:
            ip = host if ":" in host else socket.gethostbyname(host)
            self.interfaces = [ip]
            self.addresses = [ip]
        label = instance or f"microswarm-{fingerprint_hex[:12]}-{socket.gethostname().split('.')[0][:30]}"
        self.name = f"{label}.{SERVICE_TYPE}"
        self.properties = {"fp": fingerprint_hex, "id": coordinator_id, "proto": str(protocol), "v": TXT_VERSION}
        self._azc: Any = None
        self._info: Any = None
        self._task: asyncio.Task[Any] | None = None

    async def start(self) -> None:
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

        if not self.addresses:
            log.warning("not advertising on the LAN: this machine has no non-loopback address")
            return
        self._azc = AsyncZeroconf(**_zeroconf_args(self.interfaces))
        server = f"{socket.gethostname().split('.')[0][:40]}-msw.local."
        self._info = AsyncServiceInfo(SERVICE_TYPE, self.name, port=self.port, properties=self.properties,
                                      server=server, parsed_addresses=self.addresses)

        async def register() -> None:
            try:
                await (await self._azc.async_register_service(self._info, allow_name_change=True))
                log.info("advertising %s on the LAN at %s port %d", SERVICE_TYPE, ", ".join(self.addresses),
                         self.port)
            except Exception as exc:  # mDNS is a convenience: never a reason to stop serving
                log.warning("could not advertise on the LAN: %s", exc)

        self._task = asyncio.create_task(register())

    async def close(self) -> None:
        if self._azc is None:
            return
        try:
            if self._task is not None and self._task.done():
                await asyncio.wait_for(self._azc.async_unregister_service(self._info), 3)
        except Exception:  # best effort: the record expires by itself
            pass
        if self._task is not None:
            self._task.cancel()
        try:
            await asyncio.wait_for(self._azc.async_close(), 3)
        except Exception:
            pass
        self._azc = None


def _txt(info: Any) -> dict[str, str]:
    out = {}
    for k, v in (info.properties or {}).items():
        if isinstance(k, bytes):
            k = k.decode(errors="replace")
        if isinstance(v, bytes):
            v = v.decode(errors="replace")
        out[str(k)] = "" if v is None else str(v)
    return out


async def browse(timeout: float, fingerprint_hex: str | None = None, settle: float = 0.3,
                 interfaces: list[str] | None = None) -> tuple[list[Advertisement], list[Advertisement]]:
    """Browse for coordinators for up to `timeout` seconds.

    Returns (matching, others): advertisements whose fingerprint equals `fingerprint_hex` (all of
    them when it is None), and the rest. Returns early, `settle` seconds after the first match."""
    from zeroconf import ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    azc = AsyncZeroconf(**_zeroconf_args(interfaces or _env_interfaces()))
    found: dict[str, Advertisement] = {}
    pending: set[asyncio.Task[Any]] = set()
    matched = asyncio.Event()
    want = fingerprint_hex.lower() if fingerprint_hex else None

    async def resolve(name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(azc.zeroconf, 3000):
            return
        txt = _txt(info)
        ad = Advertisement(name=name, addresses=info.parsed_addresses(), port=info.port or 0,
                           fingerprint=txt.get("fp", "").lower(), coordinator_id=txt.get("id", ""),
                           protocol=txt.get("proto", ""), properties=txt)
        if not ad.addresses or not ad.port:
            return
        found[name] = ad
        if want is None or ad.fingerprint == want:
            matched.set()

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            t = asyncio.ensure_future(resolve(name))
            pending.add(t)
            t.add_done_callback(pending.discard)
        elif state_change is ServiceStateChange.Removed:
            found.pop(name, None)

    browser = AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE, handlers=[on_change])
    deadline = time.monotonic() + timeout
    try:
        try:
            await asyncio.wait_for(matched.wait(), timeout)
            await asyncio.sleep(min(settle, max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            pass
    finally:
        await browser.async_cancel()
        for t in list(pending):
            t.cancel()
        await azc.async_close()
    ads = sorted(found.values(), key=lambda a: a.name)
    if want is None:
        return ads, []
    return [a for a in ads if a.fingerprint == want], [a for a in ads if a.fingerprint != want]
