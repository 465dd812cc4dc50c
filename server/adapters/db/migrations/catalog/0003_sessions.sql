-- Sessions: the durable record of every signed-in token (its SHA-256, never the token), so a
-- Redis that loses its data or fails over signs nobody out and brings no revoked session back
-- for longer than Redis' copy is trusted (`server/adapters/sessions.py`).
CREATE TABLE sessions (
    digest      text PRIMARY KEY CHECK (length(digest) = 64),
    user_id     bigint NOT NULL,
    is_admin    boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX sessions_expires_at ON sessions (expires_at);
