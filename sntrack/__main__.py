from sntrack.cli import run

run()
