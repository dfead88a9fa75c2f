-- Where each catch-up subscriber (`sntrack subscribe`, consumers/catchup.py) stands, written before it acks.
-- position: every journal event at or below it that matches the bindings has been delivered to the subscriber's
-- handler. floor: where it began (0 from the start, the head for "from now"); journal events at or below it were
-- never its to deliver from the journal, and those its queue holds (a queue older than its row) come from the queue.
-- A subscriber needs SELECT on events and INSERT/UPDATE on its row here, nothing else.
CREATE TABLE subscriber_positions (
    name          text        PRIMARY KEY,
    bindings      text[]      NOT NULL,
    position      bigint      NOT NULL,
    floor         bigint      NOT NULL,
    last_event_id uuid,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
