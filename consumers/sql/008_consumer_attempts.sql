-- The consumer runtime's record of messages it began handling after a redelivery (issue 8): how often each one
-- was in hand when the consumer died. A row is written before a redelivered message is handled and deleted once
-- the message is settled (acked or dead-lettered), so restarts age nothing: only a message in hand at a crash
-- keeps its count. See consumers/attempts.py.
CREATE TABLE consumer_attempts (
    consumer        text        NOT NULL,
    message_key     text        NOT NULL,
    attempts        integer     NOT NULL,
    last_attempt_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_key)
);
