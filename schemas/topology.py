"""Names on the wire that producers and consumers must agree on."""

EXCHANGE = "ml.events"
DEAD_LETTER_EXCHANGE = "ml.events.dlx"

RUN_START = "ml.run.start"
RUN_METRIC = "ml.run.metric"
RUN_STOP = "ml.run.stop"

# The routing key of every event is its event_type.
ROUTING_KEYS = (RUN_START, RUN_METRIC, RUN_STOP)
ROUTING_PATTERN_ALL = "ml.run.#"

# Header carrying why a message was dead-lettered by a consumer's gate.
REASON_HEADER = "x-sntrack-reason"
DETAIL_HEADER = "x-sntrack-detail"
