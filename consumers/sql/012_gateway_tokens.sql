-- Bearer tokens of the HTTP gateway (issue 15). Only a SHA-256 digest of each token's secret is stored; the token
-- itself is shown once, by `sntrack gateway token add`. Each token is bound to the producer id the gateway stamps
-- into producer.worker_id of every event it accepts with it. Revoked tokens stay, for the record.
CREATE TABLE gateway_tokens (
    id            text        PRIMARY KEY,
    producer_id   text        NOT NULL CHECK (producer_id <> '' AND length(producer_id) <= 200),
    secret_sha256 bytea       NOT NULL CHECK (length(secret_sha256) = 32),
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);
