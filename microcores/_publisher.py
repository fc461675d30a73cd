"""Publisher keys: code signing kept off the coordinator (docs/design.md, "Publisher keys").

A publisher key pair is made once (`microswarm keys create PATH`), its private half kept on the
developer's machine (or an offline one, as BOINC keeps its code-signing key). `publish --sign-with`
signs a package's manifest, which pins the archive's and every file's sha256, so one signature
covers the whole package. A coordinator started with `--publisher-key PUB` accepts only packages
signed so, and relays the signature: agents whose join token carries publisher keys (`msw2.`)
check it themselves before extracting, so a coordinator that is taken cannot push code.

The built-in services are packaged by the coordinator and never publisher-signed: an agent that
requires publisher keys runs such a package only when its digest equals one it computes from its
own installed copy of `microcores.services` (the same code it already runs as part of its install).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._package import Package
from ._secure import fingerprint, public_bytes, write_private
from .errors import PackageError

PUBLISHER_LABEL = b"microswarm-publisher\0"
KEYS_FILE = "publisher_keys.json"   # in the coordinator's state dir: the keys it was started with


def short(key: bytes) -> str:
    """How a publisher key is named to people: its fingerprint's first 16 hex digits."""
    return fingerprint(key).hex()[:16]


def names(keys: list[bytes] | tuple[bytes, ...]) -> str:
    return ", ".join(short(k) for k in keys)


# ---------------------------------------------------------------- key files

def create(path: Path) -> tuple[Path, bytes]:
    """A new key pair: the private key at `path` (0600, never overwritten), the public at `path.pub`."""
    path = Path(path)
    pub_path = path.with_name(path.name + ".pub")
    for p in (path, pub_path):
        if p.exists():
            raise FileExistsError(f"{p} exists: refusing to overwrite a key (remove it first if you mean to)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(pub)
    return pub_path, public_bytes(key)


def load_private(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise ValueError(f"{path} is not a PEM private key ({exc}); make one with `microswarm keys create`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, expected an Ed25519 publisher key")
    return key


def load_public(path: Path | str) -> bytes:
    """The raw 32 bytes of a publisher's public key file (`keys create` writes it as PEM)."""
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path} is not a PEM public key ({exc}); pass the .pub file `microswarm keys create` "
                         "wrote") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, expected an Ed25519 publisher key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def save_keys(state_dir: Path, keys: list[bytes]) -> None:
    """What `coordinator start` was given, for `coordinator token` (another process) to put in tokens."""
    write_private(Path(state_dir) / KEYS_FILE,
                  json.dumps({"publisher_keys": [k.hex() for k in keys]}, indent=1).encode())


def read_keys(state_dir: Path) -> list[bytes]:
    p = Path(state_dir) / KEYS_FILE
    if not p.exists():
        return []
    try:
        keys = [bytes.fromhex(h) for h in json.loads(p.read_text())["publisher_keys"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{p} is damaged ({exc}); restart the coordinator with its --publisher-key flags "
                         "to write it again") from None
    if any(len(k) != 32 for k in keys):
        raise ValueError(f"{p} is damaged (a key is not 32 bytes)")
    return keys


# ---------------------------------------------------------------- signing and checking

def sign(manifest: bytes, key: Ed25519PrivateKey) -> bytes:
    return key.sign(PUBLISHER_LABEL + manifest)


def verify(manifest: bytes, signature: bytes, keys: list[bytes] | tuple[bytes, ...], what: str) -> bytes:
    """The publisher key that signed `manifest`; PackageError naming the keys accepted if none did."""
    if not signature:
        raise PackageError(f"{what} is not signed by a publisher key; only packages signed by one of "
                           f"[{names(keys)}] are accepted (publish with --sign-with KEY)")
    for k in keys:
        try:
            Ed25519PublicKey.from_public_bytes(k).verify(signature, PUBLISHER_LABEL + manifest)
            return k
        except (InvalidSignature, ValueError):
            continue
    raise PackageError(f"{what} is signed by a key that is not one of the publisher keys accepted "
                       f"[{names(keys)}] (publish with --sign-with one of them)")


@functools.lru_cache(maxsize=1)
def builtin_digests() -> frozenset[str]:
    """Digests of the built-in services' packages as this install builds them."""
    from . import services
    from ._package import build
    return frozenset(build(cls).digest for cls in services.BUILTINS)


def check_package(pkg: Package, keys: list[bytes] | tuple[bytes, ...]) -> str:
    """An agent's check when its token carries publisher keys: "publisher <fp>" or "builtin"."""
    if not pkg.publisher_signature and pkg.digest in builtin_digests():
        return "builtin"
    return "publisher " + short(verify(pkg.manifest, pkg.publisher_signature, keys, f"package {pkg.name}"))
