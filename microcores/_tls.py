"""TLS on the coordinator's ports, and how a client comes to trust it before it says anything.

The coordinator's certificate is made from its own TLS key (ECDSA P-256, which every TLS stack
and browser takes) and *bound* to its identity: an extension holds the identity's Ed25519 public
key and its signature over the certificate's public key. So the one fingerprint that join tokens
pin and `coordinator start` prints also pins the transport, as SSH's known hosts do.

A client trusts, in this order: an explicit fingerprint (`--fingerprint`, MICROSWARM_FINGERPRINT,
or an agent's join token); else the `coordinator.crt` of a state directory it can read; else the
system's certificate authorities (an operator's own `--tls-cert` from a public CA). With a
fingerprint it first fetches the certificate over a bare TLS handshake (sending nothing), checks
the binding, and then pins gRPC to exactly that certificate: no credential ever leaves before the
coordinator has proven its key. MICROSWARM_INSECURE=1 (or `insecure=True`) speaks plaintext, for a
coordinator started with `--insecure` on a trusted loopback.
"""
from __future__ import annotations

import asyncio
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ._secure import fingerprint
from .errors import MicroError

CERT_FILE = "coordinator.crt"
BINDING_OID = x509.ObjectIdentifier("1.3.6.1.4.1.59999.7070.1")
BINDING_LABEL = b"microswarm-tls-binding\0"
# Every bound certificate names this host too: clients pinned to the certificate check it against
# this name, so one certificate serves whatever address (NAT, alias, IP) an agent dials.
SERVER_NAME = "coordinator.microswarm"
FETCH_TIMEOUT_S = 10.0


class UntrustedCoordinator(MicroError):
    """The coordinator could not prove the key the client pins (or there was nothing to pin):
    nothing was sent to it."""

    code = "untrusted_coordinator"


def parse_fingerprint(text: str) -> bytes:
    clean = text.strip().lower().replace(":", "").replace(" ", "")
    if clean.startswith("sha256"):
        clean = clean[6:]
    try:
        raw = bytes.fromhex(clean)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"not a coordinator key fingerprint: {text!r} (64 hex digits, as `coordinator start` "
                         "prints after 'key fingerprint')")
    return raw


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def bound_identity(cert: x509.Certificate) -> bytes | None:
    """The identity public key a certificate is bound to, if its binding verifies; None if it has none."""
    try:
        ext = cert.extensions.get_extension_for_oid(BINDING_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value.value if isinstance(ext.value, x509.UnrecognizedExtension) else b""
    if len(value) != 96:
        return None
    key, sig = value[:32], value[32:]
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(sig, BINDING_LABEL + spki(cert))
    except (InvalidSignature, ValueError):
        return None
    return key


def binding_value(identity_sign: Any, identity_public: bytes, tls_spki: bytes) -> bytes:
    signature: bytes = identity_sign(BINDING_LABEL + tls_spki)
    return identity_public + signature


@dataclass(frozen=True)
class Trust:
    """What a client's channel trusts: plaintext, a pinned certificate, or the system's CAs."""

    insecure: bool = False
    root_pem: bytes | None = None      # None with TLS: the system's certificate authorities
    server_name: str | None = None     # the name checked instead of the dialled host (bound certificates)
    source: str = ""                   # where the trust came from, for error messages

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.root_pem)

    def channel(self, target: str, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
        opts = list(options or []) + self.options()
        if self.insecure:
            return grpc.insecure_channel(target, options=opts)
        return grpc.secure_channel(target, self.credentials(), options=opts)

    def aio_channel(self, target: str, options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
        opts = list(options or []) + self.options()
        if self.insecure:
            return grpc.aio.insecure_channel(target, options=opts)
        return grpc.aio.secure_channel(target, self.credentials(), options=opts)

    def ssl_context(self) -> ssl.SSLContext | None:
        """For HTTPS to the gateway with the same trust (None: plaintext)."""
        if self.insecure:
            return None
        ctx = ssl.create_default_context(cadata=self.root_pem.decode() if self.root_pem else None)
        if self.server_name:
            ctx.check_hostname = False  # pinned to this one certificate: the name is not what is checked
        return ctx


def insecure_from_env() -> bool:
    return os.environ.get("MICROSWARM_INSECURE", "").strip().lower() in ("1", "true", "yes", "on")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def system_roots() -> bytes | None:
    """MICROSWARM_CACERT (a PEM bundle) added to the system's CAs, for operators' own certificates;
    None: gRPC's defaults."""
    extra = os.environ.get("MICROSWARM_CACERT")
    if not extra:
        return None
    try:
        pem = Path(extra).expanduser().read_bytes()
    except OSError as exc:
        raise UntrustedCoordinator(f"MICROSWARM_CACERT {extra}: {exc.strerror}") from None
    return pem + b"\n" + _system_bundle()


def _system_bundle() -> bytes:
    paths = ssl.get_default_verify_paths()
    for f in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"):
        try:
            return Path(f).read_bytes() if f else b""
        except OSError:
            continue
    return b""


def pinned(cert: x509.Certificate, want: bytes, target: str, source: str, unbound_ok: bool = False) -> Trust:
    """Trust exactly `cert` if it is bound to the identity whose fingerprint is `want`. `unbound_ok`
    (agents): an operator's own certificate is checked through its CA instead, and the key is proven
    by the link's handshake before the agent sends anything of its own."""
    key = bound_identity(cert)
    if key is None and unbound_ok:
        return Trust(root_pem=system_roots(), source="the system's certificate authorities (MICROSWARM_CACERT)")
    if key is None:
        raise UntrustedCoordinator(
            f"the coordinator at {target} presents a certificate that is not bound to a microswarm key, so "
            f"the fingerprint from {source} cannot be checked; nothing was sent. If it serves an operator's "
            "own certificate (--tls-cert), trust that through its CA instead of a fingerprint")
    if fingerprint(key) != want:
        raise UntrustedCoordinator(
            f"the coordinator at {target} presented key {fingerprint(key).hex()}, but {source} pins "
            f"{want.hex()}: not the coordinator you meant (or its identity changed); nothing was sent")
    return Trust(root_pem=_pem(cert), server_name=SERVER_NAME, source=source)


def from_state_dir(state_dir: str | os.PathLike[str] | None) -> Trust | None:
    if state_dir is None:
        return None
    path = Path(state_dir).expanduser() / CERT_FILE
    try:
        pem = path.read_bytes()
    except OSError:
        return None
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise UntrustedCoordinator(f"{path} is not a PEM certificate: restart the coordinator to rewrite it") from None
    if bound_identity(cert) is not None:
        return Trust(root_pem=pem, server_name=SERVER_NAME, source=str(path))
    # The operator's chain may stop short of its root: its CAs (and the system's) complete it.
    return Trust(root_pem=pem + b"\n" + (system_roots() or _system_bundle()), source=str(path))


def _split(target: str) -> tuple[str, int]:
    t = target.split("///", 1)[-1]
    host, _, port = t.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator address {target!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _client_context() -> ssl.SSLContext:
    # Only to read the certificate: nothing is trusted from this handshake but what pinned() checks.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _cannot_fetch(target: str, exc: BaseException) -> MicroError:
    from .errors import Unavailable
    if isinstance(exc, ssl.SSLError):
        return UntrustedCoordinator(f"{target} did not complete a TLS handshake ({exc.reason or exc}): if the "
                                    "coordinator runs with --insecure, set MICROSWARM_INSECURE=1 (trusted "
                                    "loopback only); nothing was sent")
    return Unavailable(f"cannot reach the coordinator at {target}: {exc}")


def fetch_certificate(target: str, timeout: float = FETCH_TIMEOUT_S) -> x509.Certificate:
    host, port = _split(target)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                _client_context().wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise _cannot_fetch(target, exc) from None
    if not der:
        raise UntrustedCoordinator(f"{target} presented no certificate; nothing was sent")
    return x509.load_der_x509_certificate(der)


async def fetch_certificate_async(target: str, timeout: float = FETCH_TIMEOUT_S) -> x509.Certificate:
    host, port = _split(target)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=_client_context(), server_hostname=SERVER_NAME), timeout)
    except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
        raise _cannot_fetch(target, exc) from None
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    if not der:
        raise UntrustedCoordinator(f"{target} presented no certificate; nothing was sent")
    return x509.load_der_x509_certificate(der)


def _fingerprint_pin(fingerprint_text: str | bytes | None) -> tuple[bytes, str] | None:
    if isinstance(fingerprint_text, bytes):
        return fingerprint_text, "the join token"
    text = fingerprint_text or os.environ.get("MICROSWARM_FINGERPRINT")
    if not text:
        return None
    src = "--fingerprint" if fingerprint_text else "MICROSWARM_FINGERPRINT"
    try:
        return parse_fingerprint(text), src
    except ValueError as exc:
        raise UntrustedCoordinator(f"{src}: {exc}") from None


def _unpinned(target: str, cert: x509.Certificate) -> Trust:
    key = bound_identity(cert)
    if key is not None:
        raise UntrustedCoordinator(
            f"nothing pins the coordinator at {target}, which presents key fingerprint {fingerprint(key).hex()}. "
            "Check it with the operator (`coordinator start` prints it), then pass --fingerprint or set "
            "MICROSWARM_FINGERPRINT; or run where its state directory is readable (--state-dir or "
            "MICROSWARM_STATE_DIR). Nothing was sent")
    return Trust(root_pem=system_roots(), source="the system's certificate authorities (MICROSWARM_CACERT)")


def _without_network(fingerprint: str | bytes | None, state_dir: str | os.PathLike[str] | None,
                     insecure: bool | None) -> tuple[Trust | None, tuple[bytes, str] | None]:
    """The trust that needs no connection (plaintext, or a state directory's certificate), or else the
    fingerprint pin (None: nothing pins) that the certificate the coordinator presents must meet."""
    if insecure if insecure is not None else insecure_from_env():
        return Trust(insecure=True, source="MICROSWARM_INSECURE"), None
    pin = _fingerprint_pin(fingerprint)
    if pin is None:
        local = from_state_dir(state_dir)
        if local is not None:
            return local, None
    return None, pin


def _presented(cert: x509.Certificate, target: str, pin: tuple[bytes, str] | None, unbound_ok: bool) -> Trust:
    return _unpinned(target, cert) if pin is None else pinned(cert, pin[0], target, pin[1], unbound_ok)


def resolve(target: str, *, fingerprint: str | bytes | None = None, state_dir: str | os.PathLike[str] | None = None,
            insecure: bool | None = None) -> Trust:
    """How to trust the coordinator at `target` (see the module's docstring for the order)."""
    trust, pin = _without_network(fingerprint, state_dir, insecure)
    return trust or _presented(fetch_certificate(target), target, pin, False)


async def resolve_async(target: str, *, fingerprint: str | bytes | None = None,
                        state_dir: str | os.PathLike[str] | None = None, insecure: bool | None = None,
                        unbound_ok: bool = False) -> Trust:
    trust, pin = _without_network(fingerprint, state_dir, insecure)
    return trust or _presented(await fetch_certificate_async(target), target, pin, unbound_ok)


def handshake_failed(details: str) -> bool:
    """Whether a gRPC UNAVAILABLE came from a TLS handshake that failed (not from nobody answering)."""
    d = details.lower()
    return "handshake" in d and ("ssl" in d or "tls" in d)


def handshake_reason(details: str) -> str:
    for reason in ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "self signed certificate",
                   "Hostname mismatch", "certificate has expired"):
        if reason.lower() in details.lower():
            return reason
    return "handshake failed"
