"""An example for every `--help`, kept in one place: commands that set no epilog of their own get theirs here."""

from __future__ import annotations

import argparse

EXAMPLES = {
    "sntrack worker": "sntrack worker --study demo --n-trials 4 --design paired --dataset wine --epochs 5",
    "sntrack consume": "sntrack consume all",
    "sntrack report": "sntrack report --run demo --plot demo.png",
    "sntrack reconcile": "sntrack reconcile --run demo --repair",
    "sntrack replay": "sntrack replay trials --until 2026-11-25T12:00:00Z",
    "sntrack subscribe": "sntrack subscribe stops --bind ml.run.stop --from-start",
    "sntrack status": "sntrack status --wait-idle 60",
    "sntrack publish-sample": "sntrack publish-sample --trials 20 --epochs 10",
    "sntrack spool": "sntrack spool status",
    "sntrack spool status": "sntrack spool status",
    "sntrack spool flush": "sntrack spool flush --timeout 30",
    "sntrack topology": "sntrack topology apply   # passwords from SNTRACK_WORKER_PASSWORD, SNTRACK_CONSUMER_PASSWORD…",
    "sntrack topology apply": "sntrack topology apply --vhost sntrack",
    "sntrack topology export": "sntrack topology export --vhost sntrack",
    "sntrack topology check": "sntrack topology check",
    "sntrack db": "sntrack db migrate --create",
    "sntrack db migrate": "sntrack db migrate --create",
    "sntrack mlflow-server": "sntrack mlflow-server start --port 5000",
    "sntrack mlflow-server start": "sntrack mlflow-server start --port 5000 --backend postgres",
    "sntrack mlflow-server stop": "sntrack mlflow-server stop --port 5000",
    "sntrack mlflow-server status": "sntrack mlflow-server status --port 5000",
    "sntrack gateway token": "sntrack gateway token add notebook-alice",
    "sntrack gateway token add": "sntrack gateway token add notebook-alice",
    "sntrack gateway token list": "sntrack gateway token list",
    "sntrack gateway token revoke": "sntrack gateway token revoke 3f9a0c1b2d4e",
}


class HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual, keeps an epilog's example lines as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def add_examples(parser: argparse.ArgumentParser) -> None:
    """Give `parser` and every sub-command parser under it the shared formatter and, lacking one, an example."""
    parser.formatter_class = HelpFormatter
    if not parser.epilog and parser.prog in EXAMPLES:
        parser.epilog = f"example:\n  {EXAMPLES[parser.prog]}"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                add_examples(child)
