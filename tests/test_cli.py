"""The command line: --help everywhere, and bad configuration ends in one line and exit code 2."""

import argparse
import subprocess
import sys

import pytest

from sntrack import __version__
from sntrack.cli import build_parser, main
from tests.test_end_to_end import cli_env

COMMANDS = [name for name in build_parser()._subparsers._group_actions[0].choices]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: sntrack {command}")


def _all_parsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases share a parser; keep a stable order
                yield child
                yield from _all_parsers(child)


@pytest.mark.parametrize("parser", list(_all_parsers(build_parser())), ids=lambda p: p.prog)
def test_every_help_has_an_example_and_no_stray_percent(parser):
    text = parser.format_help()
    assert "\nexample" in text and "  sntrack " in text.split("\nexample", 1)[1], text
    assert "%%" not in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"sntrack {__version__}"


def _run(env_vars: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sntrack", *args], env=env_vars, capture_output=True, text=True,
                          timeout=60)


def test_missing_database_is_one_line(env):
    vars_ = {**cli_env(env), "SNTRACK_DATABASE_URL": env.settings.database_url + "_missing"}
    run = _run(vars_, "consume", "trials")
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "does not exist" in run.stderr, run.stderr


def test_unreachable_broker_is_one_line(env):
    run = _run({**cli_env(env), "SNTRACK_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/x"}, "consume", "trials")
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "cannot reach RabbitMQ" in run.stderr, run.stderr


def test_wrong_broker_password_is_one_line_and_not_shown(env):
    url = env.settings.amqp_url.replace("guest:guest", "guest:s3cret-wrong")
    for args in (("consume", "trials"), ("publish-sample", "--trials", "1", "--epochs", "1")):
        run = _run({**cli_env(env), "SNTRACK_AMQP_URL": url}, *args)
        assert run.returncode == 2, (args, run.stderr)
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith("sntrack: ") and "refused" in last, run.stderr
        assert "s3cret-wrong" not in run.stderr


def test_invalid_setting_names_the_variable(env):
    run = _run({**cli_env(env), "SNTRACK_BATCH_SIZE": "many"}, "status")
    assert run.returncode == 2 and "SNTRACK_BATCH_SIZE" in run.stderr


def test_the_command_table_names_what_each_module_registers():
    """`sntrack NAME …` builds the parser of NAME alone (without importing the other commands' modules): it must be
    the parser the full one holds, so that every --help and every argument error reads the same."""
    from sntrack.commands import COMMANDS

    assert COMMANDS
    full = build_parser()._subparsers._group_actions[0].choices
    assert list(full) == list(COMMANDS)
    for name in COMMANDS:
        alone = build_parser(name)._subparsers._group_actions[0].choices
        assert list(alone) == [name]
        assert alone[name].format_help() == full[name].format_help()
        helps = [[p.format_help() for p in _all_parsers(parser)] for parser in (alone[name], full[name])]
        assert helps[0] == helps[1]


def test_a_command_imports_no_other_command_module():
    code = ("import sys\nfrom sntrack.cli import main\ntry:\n    main(['report', '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in sys.modules if m.startswith('sntrack.commands.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "['sntrack.commands.report']"
