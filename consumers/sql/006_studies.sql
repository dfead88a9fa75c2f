-- Studies as objects a user can archive and remove (issue 16).

-- Soft delete: an archived study keeps every row; `studies list` hides it and reports filter on this table;
-- `sntrack studies restore` removes the row again.
CREATE TABLE archived_studies (
    model_run_id text        PRIMARY KEY,
    archived_at  timestamptz NOT NULL DEFAULT now(),
    archived_by  text        NOT NULL
);

-- Hard delete leaves a tombstone: events of the study that arrive later are recorded as applied and otherwise
-- ignored by every projection (consumers.persistence.apply_events), so the study never comes back. A name once
-- removed for good cannot be reused, as with EventStoreDB's stream deletion.
CREATE TABLE deleted_studies (
    model_run_id text        PRIMARY KEY,
    deleted_at   timestamptz NOT NULL DEFAULT now()
);

-- Who archived, restored or removed which study, when, and what went with it.
CREATE TABLE study_audit (
    id           bigserial   PRIMARY KEY,
    model_run_id text        NOT NULL,
    action       text        NOT NULL CHECK (action IN ('archive', 'restore', 'delete')),
    actor        text        NOT NULL,   -- the operating-system user and the database role
    at           timestamptz NOT NULL DEFAULT now(),
    counts       jsonb       NOT NULL DEFAULT '{}',  -- rows removed per table; for a hard delete also MLflow, Optuna
    note         text
);
CREATE INDEX study_audit_study ON study_audit (model_run_id);

-- The journal stays append-only except on the one path that removes a study for good: that transaction sets
-- sntrack.hard_delete to the study's name (set_config(..., true): transaction-local) and may then delete that
-- study's events, and only them. TRUNCATE and UPDATE stay refused.
CREATE OR REPLACE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF OLD.model_run_id = current_setting('sntrack.hard_delete', true) THEN
            RETURN OLD;
        END IF;
    END IF;
    RAISE EXCEPTION 'the events journal is append-only (% refused)', TG_OP;
END $$;
