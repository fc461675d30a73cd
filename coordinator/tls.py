"""The coordinator's TLS certificate: made from its own key and bound to its identity, or the operator's.

Made: `tls_key.pem` (ECDSA P-256, 0600, kept across restarts) and `coordinator.crt`, self-signed,
naming localhost, this host and the listen addresses, and carrying the identity's signature over
its public key (microcores._tls). It is rewritten only when the names or the identity change or it
nears its end, so a copy that clients keep stays good. `--tls-cert` and `--tls-key` serve the
operator's own certificate instead; `coordinator.crt` is then a copy of that chain, for clients.
"""
from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from microcores._secure import public_bytes, write_private
from microcores._tls import BINDING_OID, CERT_FILE, SERVER_NAME, binding_value, bound_identity, spki

KEY_FILE = "tls_key.pem"
VALID_DAYS = 3650
RENEW_BEFORE_DAYS = 60


@dataclass(frozen=True)
class ServerTLS:
    cert_path: Path      # what clients trust (STATE_DIR/coordinator.crt)
    chain_pem: bytes
    key_path: Path
    key_pem: bytes
    bound: bool          # bound to the identity (our own certificate) rather than the operator's

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.chain_pem)])

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx


def _hosts(addresses: list[str]) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    names = {SERVER_NAME, "localhost", socket.gethostname()}
    ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = {ipaddress.ip_address("127.0.0.1"),
                                                                ipaddress.ip_address("::1")}
    for addr in addresses:
        host = addr.rpartition(":")[0].strip("[]") if ":" in addr else addr
        if not host:
            continue
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            names.add(host)
            continue
        if not ip.is_unspecified:
            ips.add(ip)
    return sorted(n for n in names if n), sorted(ips, key=str)


def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key
        raise ValueError(f"{path} is not an EC private key: remove it and restart to make a new one")
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return key


def _still_good(path: Path, key: ec.EllipticCurvePrivateKey, identity_pub: bytes, names: list[str],
                ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    return (bound_identity(cert) == identity_pub and spki(cert) == _spki_of(key)
            and set(san.get_values_for_type(x509.DNSName)) >= set(names)
            and set(san.get_values_for_type(x509.IPAddress)) >= set(ips)
            and left > datetime.timedelta(days=RENEW_BEFORE_DAYS))


def _spki_of(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def make_certificate(identity: Ed25519PrivateKey, key: ec.EllipticCurvePrivateKey, names: list[str],
                     ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "microswarm coordinator")])
    binding = binding_value(identity.sign, public_bytes(identity), _spki_of(key))
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ip) for ip in ips]
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            # CA:TRUE so that clients can use this one self-signed certificate as their trust anchor.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.UnrecognizedExtension(BINDING_OID, binding), critical=False)
            .sign(key, hashes.SHA256()))


def prepare(state_path: Path, identity: Ed25519PrivateKey, addresses: list[str],
            tls_cert: str | None = None, tls_key: str | None = None) -> ServerTLS:
    """The certificate to serve, written where clients find it (STATE_DIR/coordinator.crt)."""
    crt = state_path / CERT_FILE
    if tls_cert or tls_key:
        return _operator(crt, tls_cert, tls_key)
    key_path = state_path / KEY_FILE
    key = _load_or_create_key(key_path)
    names, ips = _hosts(addresses)
    if not _still_good(crt, key, public_bytes(identity), names, ips):
        cert = make_certificate(identity, key, names, ips)
        _write_public(crt, cert.public_bytes(serialization.Encoding.PEM))
    return ServerTLS(crt, crt.read_bytes(), key_path, key_path.read_bytes(), bound=True)


def _operator(crt: Path, tls_cert: str | None, tls_key: str | None) -> ServerTLS:
    if not (tls_cert and tls_key):
        raise ValueError("--tls-cert and --tls-key go together: the certificate (PEM, leaf first, then its "
                         "chain) and its private key (PEM)")
    try:
        chain_pem, key_pem = Path(tls_cert).read_bytes(), Path(tls_key).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    except ValueError as exc:
        raise ValueError(f"--tls-cert {tls_cert}: not a PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--tls-key {tls_key}: not an unencrypted PEM private key ({exc})") from None
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != spki(leaf):
        raise ValueError(f"--tls-key {tls_key} is not the key of the certificate in --tls-cert {tls_cert}")
    _write_public(crt, chain_pem)
    return ServerTLS(crt, chain_pem, Path(tls_key), key_pem, bound=False)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".crt.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)
