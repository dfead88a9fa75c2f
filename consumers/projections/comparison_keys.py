"""The keys of sn_comparison's rows, importable without the event models: `sntrack report` reads the rows, and
building pydantic's event models was a third of its imports."""

OVERALL = "*"  # schemas.events.ALL_SEARCHES, which the contract refuses as a real model_run_id

STATS = ("val", "gap", "duration")  # column prefixes: final val accuracy, train-val gap, duration_ms
