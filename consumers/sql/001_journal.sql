-- The append-only journal: the source of truth every projection can be rebuilt from.
CREATE TABLE events (
    position       bigserial PRIMARY KEY,
    event_id       uuid        NOT NULL UNIQUE,
    event_type     text        NOT NULL,
    trial_id       text        NOT NULL,
    model_run_id   text        NOT NULL,
    seq            integer     NOT NULL,
    schema_version integer     NOT NULL,
    occurred_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    envelope       jsonb       NOT NULL
);
CREATE INDEX events_trial_seq ON events (trial_id, seq);
CREATE INDEX events_model_run ON events (model_run_id);
CREATE INDEX events_occurred_at ON events (occurred_at);

CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the events journal is append-only (% refused)', TG_OP;
END $$;
CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_append_only();

-- Which events each projection has applied, written in the same transaction as the projection's rows.
CREATE TABLE applied_events (
    projection text        NOT NULL,
    event_id   uuid        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, event_id)
);
