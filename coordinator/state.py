"""The coordinator's state directory: identity, join secrets, admin credential, packages.

Everything a restart must keep lives here, in plain files (secrets 0600), so the embedded
default needs no server. Layout:
    identity.pem            Ed25519 key; its fingerprint is pinned by every join token
    join_secrets.json       join secrets (hex), shared and per volunteer; tokens carry one (volunteers.py)
    agent_keys.json         each agent id and the key that owns it (volunteers.py)
    admin.token             the operator's credential for publishing
    registry.json           published services and their versions, newest last
    packages/<digest>/      manifest.json, manifest.sig, archive.zip, files/ (extracted), and
                            publisher.sig when a publisher signed it (microcores/_publisher.py)
    publisher_keys.json     the --publisher-key set of the last start; join tokens carry it (msw2.)
    clients.json            the gateway's clients, secrets as salted hashes (coordinator/auth.py)
    tokens.jsonl            a journal of token hashes, scopes and expiries (never the tokens)
    routes.json             routes to existing web services, header values included (0600; coordinator/routes.py)
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from microcores._package import Package, extract
from microcores.client import default_state_dir as client_default_state_dir
from microcores._secure import JoinToken, fingerprint, load_or_create_identity, public_bytes, write_private

from microcores import _publisher

from . import volunteers


def default_state_dir() -> Path:
    return Path(client_default_state_dir())


class StateDir:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).expanduser().resolve()
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._identity: Ed25519PrivateKey | None = None
        self._alias_key: bytes | None = None

    # -- identity

    @property
    def identity(self) -> Ed25519PrivateKey:
        if self._identity is None:
            self._identity = load_or_create_identity(self.path / "identity.pem")
        return self._identity

    @property
    def public_key(self) -> bytes:
        return public_bytes(self.identity)

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.public_key)

    # -- join secrets and tokens

    @property
    def secrets_path(self) -> Path:
        return self.path / volunteers.SECRETS_FILE

    # The methods below up to "the operator's credential" and from "packages" on are the state's
    # storage seam: files here, PostgreSQL in pgstore.PgStateDir (--state-url), which overrides them.

    def join_tokens(self) -> list[volunteers.VolunteerToken]:
        """Every join token, shared ones first (revoked ones too)."""
        return volunteers.load_tokens(self.secrets_path)

    def join_secrets(self) -> list[bytes]:
        """The secrets agents may join with: the shared ones and the named tokens not revoked."""
        return [t.secret for t in self.join_tokens() if not t.revoked]

    def add_join_secret(self) -> bytes:
        return volunteers.add_shared(self.secrets_path)

    def mint_token(self, name: str, max_agents: int | None, max_slots: int | None
                   ) -> tuple[volunteers.VolunteerToken, str]:
        return volunteers.mint(self.secrets_path, name, max_agents, max_slots)

    def revoke_token(self, name: str) -> tuple[volunteers.VolunteerToken, bool]:
        return volunteers.revoke(self.secrets_path, name)

    def token(self, new: bool = False) -> str:
        """The shared join token (the first shared secret; a new one with `new`)."""
        shared = [t.secret for t in self.join_tokens() if not t.name]
        secret = self.add_join_secret() if new or not shared else shared[0]
        return JoinToken(self.fingerprint, secret, tuple(self.publisher_keys())).encode()

    def volunteer_token(self, name: str, max_agents: int | None = None, max_slots: int | None = None
                        ) -> tuple[str, volunteers.VolunteerToken, str]:
        """(token text, its entry, "minted" | "unchanged" | "updated") for the volunteer `name`."""
        tok, what = self.mint_token(name, max_agents, max_slots)
        return JoinToken(self.fingerprint, tok.secret, tuple(self.publisher_keys())).encode(), tok, what

    def publisher_keys(self) -> list[bytes]:
        """The --publisher-key set the coordinator was last started with (tokens carry it)."""
        return _publisher.read_keys(self.path)

    def save_publisher_keys(self, keys: list[bytes]) -> None:
        _publisher.save_keys(self.path, keys)

    def pseudonym(self, agent_id: str) -> str:
        """A stable stand-in for an agent id, shown to callers who are not the operator: keyed by a
        secret derived from the coordinator's identity, so it cannot be matched to a guessed id."""
        if self._alias_key is None:
            raw = self.identity.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption())
            self._alias_key = hashlib.sha256(b"microswarm/agent-pseudonym\0" + raw).digest()
        return "agent-" + hmac.new(self._alias_key, agent_id.encode(), hashlib.sha256).hexdigest()[:12]

    # -- the operator's credential

    def admin_token(self, create: bool = True) -> str | None:
        p = self.path / "admin.token"
        if p.exists():
            return p.read_text().strip()
        if not create:
            return None
        tok = secrets.token_urlsafe(32)
        write_private(p, tok.encode())
        return tok

    # -- packages and the registry index

    def package_dir(self, digest: str) -> Path:
        return self.path / "packages" / digest

    def store_package(self, pkg: Package) -> Path:
        d = self.package_dir(pkg.digest)
        if not (d / "files" / ".manifest.json").exists():
            extract(pkg, d / "files")
        for name, data in (("manifest.json", pkg.manifest), ("manifest.sig", pkg.signature),
                           ("archive.zip", pkg.archive), ("publisher.sig", pkg.publisher_signature)):
            if not (d / name).exists() and (data or name != "publisher.sig"):
                tmp = d / (name + ".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, d / name)
        return d

    def store_publisher_signature(self, pkg: Package) -> None:
        p = self.package_dir(pkg.digest) / "publisher.sig"
        p.with_suffix(".tmp").write_bytes(pkg.publisher_signature)
        os.replace(p.with_suffix(".tmp"), p)

    def load_package(self, digest: str) -> Package:
        d = self.package_dir(digest)
        pub = d / "publisher.sig"
        return Package((d / "manifest.json").read_bytes(), (d / "archive.zip").read_bytes(),
                       (d / "manifest.sig").read_bytes(), pub.read_bytes() if pub.exists() else b"")

    def read_registry(self) -> list[dict[str, Any]]:
        p = self.path / "registry.json"
        if not p.exists():
            return []
        try:
            data = json.loads(p.read_text())
        except ValueError as exc:
            raise ValueError(f"{p} is not valid JSON ({exc}); restore it or remove it to forget "
                             "published services") from None
        return list(data.get("published", []))

    def add_published(self, published: list[dict[str, Any]], record: dict[str, Any], pkg: Package) -> None:
        """Record a newly published version (`pkg`, stored by store_package already) after `published`."""
        self.write_registry([*published, record])

    def write_registry(self, published: list[dict[str, Any]]) -> None:
        p = self.path / "registry.json"
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps({"published": published}, indent=1))
        os.replace(tmp, p)
