"""bench/profile.py's summary of py-spy's raw samples (pure logic: fixed samples in, shares out)."""

from bench.profile import OTHER, summarize

RAW = """\
run (sntrack/cli.py:103);Store.apply (consumers/persistence.py:254);write (asyncio/selector_events.py:1057) 6
run (sntrack/cli.py:103);Store.apply (consumers/persistence.py:254);_do_execute (asyncpg/connection.py:2066) 2
run (sntrack/cli.py:103);parse_event (schemas/gate.py:53);validate_json (pydantic/type_adapter.py:466) 1
run (sntrack/cli.py:103);get_frame (aiormq/connection.py:227) 1
"""


def test_samples_are_shared_by_the_innermost_frame_and_by_steps_anywhere_on_the_stack():
    summary = summarize(RAW + "a line that is not a sample\n", top=2)
    assert summary["samples"] == 10
    parts = summary["parts_pct"]
    assert parts["asyncio: event loop, transports and their socket system calls"] == 60.0
    assert parts["asyncpg: the PostgreSQL protocol"] == 20.0
    assert parts["pydantic: the gate's validation"] == 10.0
    assert parts["aio-pika, aiormq, pamqp: the AMQP protocol"] == 10.0
    assert parts["sntrack's own code"] == 0.0 and parts[OTHER] == 0.0
    steps = summary["steps_pct"]
    assert steps["a batch's transaction (Store.apply: BEGIN, bookkeeping, projection, COMMIT)"] == 80.0
    assert steps["the gate (parse_event)"] == 10.0
    assert summary["top_pct"] == [["write (asyncio/selector_events.py:1057)", 60.0],
                                  ["_do_execute (asyncpg/connection.py:2066)", 20.0]]


def test_no_samples_give_zero_shares():
    summary = summarize("")
    assert summary["samples"] == 0 and set(summary["parts_pct"].values()) == {0.0} and summary["top_pct"] == []
