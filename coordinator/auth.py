"""Clients and bearer tokens: OAuth 2.0 client credentials (the paper's authentication server).

A *client* is an id, a 32-character secret (A-Z, a-z, 0-9, shown once) and scopes: glob patterns
over service names (`*`, `examples.*`, `math.compute`). Only a salted hash of the secret is kept,
in `clients.json` (0600) in the coordinator's state directory.

A *token* is opaque: 256 random bits, base64url, with a prefix saying what it is (`msat_` access,
`msrt_` refresh). The coordinator keeps no token, only sha256(token): verification is one sha256
and one dict lookup (a microsecond or two), done on every call. What a restart must keep (hashes,
owner, scopes, expiry, family, rotation marks) goes into `tokens.jsonl` (0600), an append-only
journal compacted at start and whenever it has grown well past the live set.

Refresh tokens (RFC 6749 says client credentials SHOULD NOT get them; the paper gives them): each
refresh rotates, answering a new access and a new refresh token of the same *family*; a refresh
token presented a second time means it was copied, so the whole family (every access and refresh
token descended from the same client_credentials grant) is revoked at once.

The operator's admin credential (`admin.token` in the state directory) mints tokens for the
built-in client `operator` (scope `*`, no refresh token: the credential itself mints anew), which
is how the CLI, the demo and the benchmark call services with no client to create first.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import string
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable

from microcores._secure import write_private

from .ratelimit import Bucket

log = logging.getLogger("microswarm.auth")

ACCESS_TTL_S = 3600.0
REFRESH_TTL_S = 30 * 24 * 3600.0
SECRET_ALPHABET = string.ascii_letters + string.digits
SECRET_LENGTH = 32
OPERATOR = "operator"
ACCESS_PREFIX = "msat_"
REFRESH_PREFIX = "msrt_"
MAX_SCOPES = 64
MAX_NAME = 64
SCOPE_CHARS = set(string.ascii_lowercase + string.digits + "_.*?[]!-")
# Token requests (POST /oauth/token, gRPC Token): (rate per second, burst) per client id and per
# address. An honest client asks once an hour; a burst past these is answered 429 / RESOURCE_EXHAUSTED.
TOKEN_LIMIT_PER_CLIENT = (1.0, 30.0)
TOKEN_LIMIT_PER_ADDRESS = (5.0, 100.0)
TOKEN_LIMIT_KEYS = 8192  # buckets kept per kind; full ones are forgotten first


class RateLimiter:
    """Token buckets by key (a client id, an address), bounded in number."""

    def __init__(self, rate: float, burst: float, keys: int = TOKEN_LIMIT_KEYS) -> None:
        self.rate, self.burst, self.keys = rate, burst, keys
        self.buckets: dict[str, Bucket] = {}
        self.limited = 0

    def take(self, key: str, now: float | None = None) -> float:
        """0 when allowed, else the seconds until one request would be."""
        now = time.monotonic() if now is None else now
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= self.keys:
                self._prune(now)
            b = self.buckets[key] = Bucket(self.rate, self.burst, stamp=now)
        if b.take(now):
            return 0.0
        self.limited += 1
        return (1.0 - b.tokens) / self.rate

    def _prune(self, now: float) -> None:
        full = self.burst / self.rate  # a bucket untouched this long is full again: forgetting it changes nothing
        for k in [k for k, b in self.buckets.items() if now - b.stamp >= full]:
            del self.buckets[k]
        while len(self.buckets) >= self.keys:  # still too many: the least recently used go
            del self.buckets[min(self.buckets, key=lambda k: self.buckets[k].stamp)]


class AuthError(Exception):
    """A refusal in OAuth terms: `error` is the RFC 6749/6750 code, `status` the HTTP status."""

    def __init__(self, error: str, description: str, status: int = 401, scope: str = "",
                 retry_after: float = 0.0) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.scope = scope
        self.retry_after = retry_after  # rate_limited (429): seconds until a request would be taken

    @property
    def code(self) -> str:
        """The envelope's error code (microcores.errors): unauthenticated or forbidden."""
        return "forbidden" if self.status == 403 else "unauthenticated"

    def www_authenticate(self) -> str:
        """The header value of RFC 6750 section 3 (no error code when no token came at all)."""
        if self.error == "missing_token":
            return 'Bearer realm="microswarm"'
        v = f'Bearer realm="microswarm", error="{self.error}", error_description="{self.description}"'
        if self.scope:
            v += f', scope="{self.scope}"'
        return v


@dataclass
class ClientRecord:
    client_id: str
    name: str
    scopes: tuple[str, ...]
    salt: bytes
    secret_hash: bytes
    created: float
    revoked: float = 0.0

    def public(self) -> dict[str, Any]:
        """What `clients list` shows: never the secret nor its hash."""
        return {"client_id": self.client_id, "name": self.name, "scopes": list(self.scopes),
                "created": self.created, "revoked": self.revoked or None}

    def to_json(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "name": self.name, "scopes": list(self.scopes),
                "salt": self.salt.hex(), "secret_sha256": self.secret_hash.hex(), "created": self.created,
                "revoked": self.revoked}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ClientRecord":
        return cls(str(d["client_id"]), str(d["name"]), tuple(d["scopes"]), bytes.fromhex(d["salt"]),
                   bytes.fromhex(d["secret_sha256"]), float(d["created"]), float(d.get("revoked") or 0.0))


@dataclass(eq=False)
class Token:
    """What the coordinator knows of one token: never the token itself."""

    digest: bytes
    kind: str                   # "access" | "refresh"
    client_id: str
    scopes: tuple[str, ...]
    expires: float
    family: str
    revoked: bool = False
    used: bool = False          # a refresh token that was already rotated
    _allowed: dict[str, bool] = field(default_factory=dict, repr=False)

    def permits(self, service: str) -> bool:
        ok = self._allowed.get(service)
        if ok is None:
            ok = any(fnmatchcase(service, p) for p in self.scopes)
            if len(self._allowed) < 1024:
                self._allowed[service] = ok
        return ok


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def new_secret() -> str:
    return "".join(secrets.choice(SECRET_ALPHABET) for _ in range(SECRET_LENGTH))


def hash_secret(salt: bytes, secret: str) -> bytes:
    """Salted HMAC-SHA256. A secret is 32 random characters of 62 (190 bits), so a slow password
    hash would add nothing an attacker could notice, and would cost every token request."""
    return hmac.new(salt, secret.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


def parse_scopes(scope: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Space-separated (or listed) glob patterns over service names; refuses anything else."""
    if scope is None:
        return ()
    parts = scope.split() if isinstance(scope, str) else [p for s in scope for p in s.split()]
    if len(parts) > MAX_SCOPES:
        raise ValueError(f"at most {MAX_SCOPES} scope patterns")
    for p in parts:
        if not p or len(p) > 130 or not set(p) <= SCOPE_CHARS:
            raise ValueError(f"scope {p[:40]!r} is not a pattern over service names "
                             "(lower-case letters, digits, '_', '.', and the globs * ? [ ] !)")
    return tuple(dict.fromkeys(parts))


GLOB_CHARS = frozenset("*?[]!")


def narrows(requested: str, allowed: tuple[str, ...]) -> bool:
    """Whether a requested pattern stays inside the allowed ones, read as patterns, not strings.

    Whether one glob covers another is hard in general (`math.[!c]*` does not cover `math.*`, yet
    `math.*` matches the string "math.[!c]*"), so the rule is a sound subset: a requested pattern
    is allowed when it equals a granted pattern, or has no glob character and a granted pattern
    matches it (`math.compute` inside `math.*`), or a granted pattern is `*` (which covers all)."""
    if not GLOB_CHARS & set(requested):
        return any(fnmatchcase(requested, a) for a in allowed)
    return any(requested == a or a == "*" for a in allowed)


class Auth:
    """Clients, tokens and their checks, for both the gRPC and the HTTP side."""

    def __init__(self, state_path: Path | str, *, access_ttl: float = ACCESS_TTL_S,
                 refresh_ttl: float = REFRESH_TTL_S, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(state_path)
        self.access_ttl = float(access_ttl)
        self.refresh_ttl = float(refresh_ttl)
        self.clock = clock
        self.clients: dict[str, ClientRecord] = {}
        self.tokens: dict[bytes, Token] = {}
        self.families: dict[str, set[bytes]] = {}
        self._journal: Any = None
        self._journal_lines = 0
        self.issued = 0
        self.refused = 0
        self.per_client = RateLimiter(*TOKEN_LIMIT_PER_CLIENT)
        self.per_address = RateLimiter(*TOKEN_LIMIT_PER_ADDRESS)
        self.load()

    # ------------------------------------------------------------ persistence

    @property
    def clients_file(self) -> Path:
        return self.path / "clients.json"

    @property
    def journal_file(self) -> Path:
        return self.path / "tokens.jsonl"

    def load(self) -> None:
        if self.clients_file.exists():
            try:
                data = json.loads(self.clients_file.read_text())
                self.clients = {c["client_id"]: ClientRecord.from_json(c) for c in data.get("clients", [])}
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{self.clients_file} is damaged ({exc}); restore it, or remove it "
                                 "and create the clients again") from None
        self.tokens.clear()
        self.families.clear()
        if self.journal_file.exists():
            with open(self.journal_file, "rb") as f:
                for line in f:
                    try:
                        self._replay(json.loads(line))
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line after a crash: skip it
        self._compact()

    def reload_clients(self) -> None:
        """Re-read clients.json only (SIGHUP, or the file changed): tokens stay as they are, and a
        client no longer listed or now revoked loses its tokens at once. A damaged file raises
        ValueError and keeps the clients in memory."""
        try:
            data = json.loads(self.clients_file.read_text()) if self.clients_file.exists() else {}
            clients = {c["client_id"]: ClientRecord.from_json(c) for c in data.get("clients", [])}
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.clients_file} is damaged ({exc})") from None
        self.clients = clients
        for t in [t for t in self.tokens.values()
                  if t.client_id != OPERATOR and (t.client_id not in clients or clients[t.client_id].revoked)]:
            self._drop(t)

    reload = reload_clients  # the coordinator's SIGHUP hook

    def _replay(self, r: dict[str, Any]) -> None:
        op = r["op"]
        if op == "issue":
            self._index(Token(bytes.fromhex(r["h"]), r["kind"], r["client"], tuple(r["scopes"]), float(r["exp"]),
                              r["family"]))
            return
        t = self.tokens.get(bytes.fromhex(r["h"])) if "h" in r else None
        if op == "used" and t is not None:
            t.used = True
        elif op == "revoke" and t is not None:
            self._drop(t)
        elif op == "revoke_family":
            self._drop_family(r["family"])

    def _live(self, t: Token, now: float) -> bool:
        if t.revoked or t.expires <= now:
            return False
        if t.client_id == OPERATOR:
            return True
        c = self.clients.get(t.client_id)
        return c is not None and not c.revoked

    def _compact(self) -> None:
        """Rewrite the journal with the live tokens only, and reopen it for appends."""
        if self._journal is not None:
            self._journal.close()
        now = self.clock()
        for t in [t for t in self.tokens.values() if not self._live(t, now)]:
            self._drop(t)
        lines = []
        for t in self.tokens.values():
            lines.append(self._issue_record(t))
            if t.used:
                lines.append(json.dumps({"op": "used", "h": t.digest.hex()}))
        write_private(self.journal_file, "".join(line + "\n" for line in lines).encode())
        fd = os.open(self.journal_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._journal = os.fdopen(fd, "a", buffering=1)
        self._journal_lines = len(lines)

    @staticmethod
    def _issue_record(t: Token) -> str:
        return json.dumps({"op": "issue", "h": t.digest.hex(), "kind": t.kind, "client": t.client_id,
                           "scopes": list(t.scopes), "exp": t.expires, "family": t.family})

    def _append(self, record: str) -> None:
        self._journal.write(record + "\n")
        self._journal_lines += 1

    def _save_clients(self) -> None:
        data = {"clients": [c.to_json() for c in self.clients.values()]}
        write_private(self.clients_file, json.dumps(data, indent=1).encode())

    def housekeeping(self) -> None:
        """Forget expired tokens; compact the journal when it is mostly dead lines."""
        now = self.clock()
        for t in [t for t in self.tokens.values() if t.expires <= now]:
            self._drop(t)
        if self._journal_lines > 2 * len(self.tokens) + 1000:
            self._compact()

    async def run_housekeeping(self, every_s: float = 60.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                self.housekeeping()
            except OSError as exc:  # pragma: no cover - a full disk: keep serving from memory
                log.error("token journal compaction failed: %s", exc)

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    # ------------------------------------------------------------ clients

    def create_client(self, name: str, scopes: list[str] | tuple[str, ...] | None = None
                      ) -> tuple[ClientRecord, str]:
        name = name.strip()
        if not name or len(name) > MAX_NAME or not name.isprintable():
            raise ValueError(f"a client name is 1-{MAX_NAME} printable characters")
        if any(c.name == name and not c.revoked for c in self.clients.values()):
            raise ValueError(f"a client named {name!r} already exists; revoke it first or pick another name")
        pats = parse_scopes(list(scopes or ())) or ("*",)
        secret = new_secret()
        salt = os.urandom(16)
        cid = "msc_" + secrets.token_hex(10)
        rec = ClientRecord(cid, name, pats, salt, hash_secret(salt, secret), round(self.clock(), 3))
        self.clients[cid] = rec
        self._save_clients()
        log.info("client %s (%s) created with scopes %s", cid, name, " ".join(pats))
        return rec, secret

    def list_clients(self) -> list[dict[str, Any]]:
        return [c.public() for c in sorted(self.clients.values(), key=lambda c: c.created)]

    def find_client(self, ident: str) -> ClientRecord:
        rec = self.clients.get(ident)
        if rec is None:
            named = [c for c in self.clients.values() if c.name == ident and not c.revoked]
            if len(named) == 1:
                rec = named[0]
        if rec is None:
            raise KeyError(f"no client with id or name {ident!r} (see `microswarm clients list`)")
        return rec

    def revoke_client(self, ident: str) -> ClientRecord:
        """The client can no longer get tokens, and every token it holds stops working now."""
        rec = self.find_client(ident)
        if not rec.revoked:
            rec.revoked = round(self.clock(), 3)
            self._save_clients()
            for t in [t for t in self.tokens.values() if t.client_id == rec.client_id]:
                self._drop(t)
            log.info("client %s (%s) revoked", rec.client_id, rec.name)
        return rec

    def authenticate(self, client_id: str, secret: str) -> ClientRecord:
        rec = self.clients.get(client_id)
        # the same work whether or not the id exists: no timing oracle on ids
        salt, want = (rec.salt, rec.secret_hash) if rec is not None else (b"\0" * 16, b"\0" * 32)
        ok = hmac.compare_digest(hash_secret(salt, secret), want)
        if rec is None or not ok or rec.revoked:
            self.refused += 1
            raise AuthError("invalid_client", "unknown client or wrong secret" if not (rec and ok)
                            else "this client was revoked", 401)
        return rec

    # ------------------------------------------------------------ tokens

    def _index(self, t: Token) -> None:
        self.tokens[t.digest] = t
        self.families.setdefault(t.family, set()).add(t.digest)

    def _drop(self, t: Token) -> None:
        t.revoked = True  # holders of the object (a gRPC stream) see it too
        self.tokens.pop(t.digest, None)
        fam = self.families.get(t.family)
        if fam is not None:
            fam.discard(t.digest)
            if not fam:
                del self.families[t.family]

    def _drop_family(self, family: str) -> None:
        for d in list(self.families.get(family, ())):
            t = self.tokens.get(d)
            if t is not None:
                self._drop(t)

    def _mint(self, kind: str, client_id: str, scopes: tuple[str, ...], family: str, ttl: float) -> str:
        tok = (ACCESS_PREFIX if kind == "access" else REFRESH_PREFIX) + secrets.token_urlsafe(32)
        t = Token(token_digest(tok), kind, client_id, scopes, round(self.clock() + ttl, 3), family)
        self._index(t)
        self._append(self._issue_record(t))
        return tok

    def _grant(self, client_id: str, scopes: tuple[str, ...], family: str, refresh: bool) -> dict[str, Any]:
        self.issued += 1
        answer: dict[str, Any] = {
            "access_token": self._mint("access", client_id, scopes, family, self.access_ttl),
            "token_type": "Bearer",
            "expires_in": int(self.access_ttl) if self.access_ttl == int(self.access_ttl) else self.access_ttl,
            "scope": " ".join(scopes),
        }
        if refresh:
            answer["refresh_token"] = self._mint("refresh", client_id, scopes, family, self.refresh_ttl)
        return answer

    def limit_token_requests(self, address: str = "", client_id: str = "") -> None:
        """One token request from `address` and/or for `client_id`: AuthError rate_limited (429)
        when either has asked too often (TOKEN_LIMIT_PER_ADDRESS, TOKEN_LIMIT_PER_CLIENT)."""
        for key, limiter, who in ((address, self.per_address, "this address"),
                                  (client_id, self.per_client, "this client")):
            if not key:
                continue
            wait = limiter.take(key)
            if wait:
                self.refused += 1
                raise AuthError("rate_limited", f"too many token requests from {who} "
                                f"(at most {limiter.burst:g} at once, then {limiter.rate:g} a second): "
                                f"retry in {wait:.1f} s, and keep a token until it expires", 429,
                                retry_after=wait)

    def _scopes_for(self, allowed: tuple[str, ...], requested: str | None) -> tuple[str, ...]:
        try:
            want = parse_scopes(requested)
        except ValueError as exc:
            raise AuthError("invalid_scope", str(exc), 400) from None
        if not want:
            return allowed
        outside = [p for p in want if not narrows(p, allowed)]
        if outside:
            raise AuthError("invalid_scope", f"scope {' '.join(outside)} is not covered by this client's "
                                             f"({' '.join(allowed)}): ask for one of those patterns exactly, "
                                             "or for service names they match", 400)
        return want

    def client_credentials(self, client: ClientRecord, scope: str | None = None) -> dict[str, Any]:
        scopes = self._scopes_for(client.scopes, scope)
        answer = self._grant(client.client_id, scopes, secrets.token_hex(8), refresh=True)
        log.info("token issued to client %s (scope %s)", client.client_id, answer["scope"])
        return answer

    def operator_grant(self, admin_credential: str, presented: str) -> dict[str, Any]:
        """A token for the operator's own tools: proven by the admin credential of the state dir."""
        if not (admin_credential and presented
                and hmac.compare_digest(presented.encode(), admin_credential.encode())):
            self.refused += 1
            raise AuthError("invalid_client", "wrong admin credential", 401)
        return self._grant(OPERATOR, ("*",), secrets.token_hex(8), refresh=False)

    def refresh(self, client: ClientRecord, refresh_token: str, scope: str | None = None) -> dict[str, Any]:
        t = self.tokens.get(token_digest(refresh_token))
        if t is None or t.kind != "refresh" or t.client_id != client.client_id:
            raise AuthError("invalid_grant", "unknown, expired or revoked refresh token", 400)
        if t.expires <= self.clock():
            self._drop(t)
            raise AuthError("invalid_grant", "the refresh token has expired; ask for a new token", 400)
        if t.used:
            # Someone presented a refresh token that was already exchanged: one of the two
            # holders is not the client. End the whole family; the client authenticates anew.
            self._drop_family(t.family)
            self._append(json.dumps({"op": "revoke_family", "family": t.family}))
            log.warning("refresh token reuse by client %s: token family %s revoked", client.client_id, t.family)
            raise AuthError("invalid_grant", "this refresh token was already used; every token issued "
                                             "from it is now revoked", 400)
        scopes = self._scopes_for(t.scopes, scope)
        t.used = True
        t.expires = min(t.expires, self.clock() + self.refresh_ttl)
        self._append(json.dumps({"op": "used", "h": t.digest.hex()}))
        answer = self._grant(client.client_id, scopes, t.family, refresh=True)
        log.info("token refreshed for client %s", client.client_id)
        return answer

    def revoke(self, client: ClientRecord | None, token: str, hint: str = "") -> None:
        """RFC 7009: end a token the client holds. A refresh token takes its family with it.
        Unknown tokens, or another client's, are quietly ignored (the answer is 200 either way)."""
        t = self.tokens.get(token_digest(token))
        if t is None or (client is not None and t.client_id != client.client_id):
            return
        if t.kind == "refresh":
            self._drop_family(t.family)
            self._append(json.dumps({"op": "revoke_family", "family": t.family}))
        else:
            self._drop(t)
            self._append(json.dumps({"op": "revoke", "h": t.digest.hex()}))
        log.info("token of client %s revoked", t.client_id)

    # ------------------------------------------------------------ checks on every call

    def verify(self, bearer: str | None) -> Token:
        """The access token behind `Bearer ...` (a header value or the bare token), or AuthError."""
        if not bearer:
            self.refused += 1
            raise AuthError("missing_token", "no bearer token: get one from POST /oauth/token with your "
                                             "client credentials (microswarm clients create NAME)", 401)
        if bearer[:7].lower() == "bearer ":
            bearer = bearer[7:].strip()
        elif " " in bearer:
            self.refused += 1
            raise AuthError("invalid_request", "the Authorization header must be 'Bearer <token>'", 401)
        t = self.tokens.get(token_digest(bearer))
        if t is None or t.kind != "access":
            self.refused += 1
            raise AuthError("invalid_token", "unknown or revoked token", 401)
        if t.expires <= self.clock():
            self.refused += 1
            raise AuthError("invalid_token", "the token has expired", 401)
        return t

    def check(self, t: Token, service: str) -> None:
        """Still valid (a stream holds its token object) and the service within its scope."""
        if t.revoked:
            self.refused += 1
            raise AuthError("invalid_token", "the token was revoked", 401)
        if t.expires <= self.clock():
            self.refused += 1
            raise AuthError("invalid_token", "the token has expired", 401)
        if not t.permits(service):
            self.refused += 1
            raise AuthError("insufficient_scope", f"{service} is outside this token's scope "
                                                  f"({' '.join(t.scopes)})", 403, scope=service)

    def authorize(self, bearer: str | None, service: str) -> Token:
        t = self.verify(bearer)
        self.check(t, service)
        return t

    def stats(self) -> dict[str, int]:
        return {"clients": sum(1 for c in self.clients.values() if not c.revoked), "tokens": len(self.tokens),
                "issued": self.issued, "refused": self.refused}
