-- microswarm shared state, version 1: what coordinators of one cluster must agree on.
-- Times are unix seconds (double precision), as in the state directory's files.

-- Signed packages, by digest; a registry row names the current revision of a service.
CREATE TABLE packages (
    digest        text PRIMARY KEY,
    manifest      bytea NOT NULL,
    archive       bytea NOT NULL,
    signature     bytea NOT NULL,
    publisher_sig bytea NOT NULL DEFAULT ''::bytea,
    stored_at     double precision NOT NULL DEFAULT extract(epoch FROM now())
);

CREATE TABLE registry (
    seq          bigserial PRIMARY KEY,
    name         text NOT NULL,
    version      text NOT NULL,
    digest       text NOT NULL REFERENCES packages (digest),
    revision     integer NOT NULL,
    published_at double precision NOT NULL,
    UNIQUE (name, revision)
);

-- Small cluster-wide settings (the --publisher-key set that join tokens carry).
CREATE TABLE settings (
    key   text PRIMARY KEY,
    value jsonb NOT NULL
);

-- Join secrets: shared ones (name '') and volunteers' named tokens with their caps.
CREATE TABLE join_tokens (
    id         bigserial PRIMARY KEY,
    name       text NOT NULL DEFAULT '',
    secret     bytea NOT NULL UNIQUE,
    max_agents integer NOT NULL DEFAULT 0,
    max_slots  integer NOT NULL DEFAULT 0,
    created    double precision NOT NULL DEFAULT 0,
    revoked    double precision NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX join_tokens_one_active_name ON join_tokens (name) WHERE name <> '' AND revoked = 0;

-- Each agent id and the key that first joined under it: the first key stored wins.
CREATE TABLE agent_keys (
    agent_id text PRIMARY KEY,
    key      bytea NOT NULL,
    token    text NOT NULL DEFAULT '',
    since    double precision NOT NULL,
    seen     double precision NOT NULL
);

-- Gateway clients: secrets as salted hashes only.
CREATE TABLE oauth_clients (
    client_id   text PRIMARY KEY,
    name        text NOT NULL,
    scopes      text[] NOT NULL,
    salt        bytea NOT NULL,
    secret_hash bytea NOT NULL,
    created     double precision NOT NULL,
    revoked     double precision NOT NULL DEFAULT 0
);

-- Bearer tokens by sha256: never the tokens themselves.
CREATE TABLE oauth_tokens (
    digest    bytea PRIMARY KEY,
    kind      text NOT NULL,
    client_id text NOT NULL,
    scopes    text[] NOT NULL,
    expires   double precision NOT NULL,
    family    text NOT NULL,
    used      boolean NOT NULL DEFAULT false,
    revoked   boolean NOT NULL DEFAULT false
);
CREATE INDEX oauth_tokens_family ON oauth_tokens (family);
CREATE INDEX oauth_tokens_expires ON oauth_tokens (expires);
