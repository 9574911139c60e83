-- API keys: only a SHA-256 of the secret is stored; the key id is public and names the key.
CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    secret_hash bytea NOT NULL,
    scopes      text[] NOT NULL CHECK (cardinality(scopes) > 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
