"""Usage errors of every ``mailwarden`` command are one line, exit 2 (issue 14).

Proves: every command and group below ``main`` is mounted with the CLI's own
classes (so none prints click's multi-line usage block); for each command an
unknown option, and for each group an unknown or missing subcommand, gives
exactly ``mailwarden: <command path>: <problem> (see --help)`` and exit 2; a
missing argument and a bad option value name the argument or option; a
config file that does not exist is one line naming it, exit 2.  In-process
(click's runner): the subprocess paths are covered by the integration tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cli import main
from cli.common import check_one_line


def _paths(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, cmd in sorted(group.commands.items()):
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _paths(cmd, (*prefix, name))


COMMANDS = [path for path, _cmd in _paths(main)]
GROUPS = [path for path, cmd in _paths(main) if isinstance(cmd, click.Group)]


def run(*args: str) -> tuple[int, list[str]]:
    res = CliRunner().invoke(main, list(args), prog_name="mailwarden")
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.output.strip().splitlines()


def test_every_command_is_mounted_with_the_one_line_classes() -> None:
    assert check_one_line(main) == []
    # What the tests below walk: the commands the issue names, at least.
    for path in [("serve",), ("check",), ("quarantine", "list"), ("log", "export"),
                 ("audit", "list"), ("purge",), ("subject-access",), ("erase",)]:
        assert path in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_unknown_option_is_one_line(path: tuple[str, ...]) -> None:
    code, lines = run(*path, "--no-such-option")
    assert code == 2
    assert lines == [f"mailwarden: {' '.join(path)}: No such option '--no-such-option'."
                     " (see --help)"]


@pytest.mark.parametrize("path", [(), *GROUPS], ids=lambda p: " ".join(p) or "mailwarden")
def test_unknown_and_missing_subcommand_are_one_line(path: tuple[str, ...]) -> None:
    where = f"{' '.join(path)}: " if path else ""
    code, lines = run(*path, "no-such-command")
    assert code == 2
    assert lines == [f"mailwarden: {where}No such command 'no-such-command'. (see --help)"]
    code, lines = run(*path, "--config", "/nonexistent.toml")  # options, no subcommand
    assert code == 2
    assert lines == [f"mailwarden: {where}Missing command. (see --help)"]
    # Nothing at all after a group is a request for its help (click's rule), exit 2.
    code, lines = run(*path)
    assert code == 2 and lines[0].startswith("Usage: mailwarden")


def test_missing_argument_and_bad_value_name_what_is_wrong() -> None:
    assert run("quarantine", "show") == (
        2, ["mailwarden: quarantine show: Missing argument 'ID'. (see --help)"])
    code, lines = run("quarantine", "list", "--limit", "0")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("mailwarden: quarantine list: Invalid value for '--limit'")
    code, lines = run("log", "export", "--json", "--format", "csv")
    assert (code, lines) == (
        2, ["mailwarden: log export: --json and --format csv contradict each other (see --help)"])


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    for args in (["quarantine", "list"], ["log", "verify"], ["check"], ["serve"]):
        code, lines = run("--config", str(missing), *args)
        assert code == 2, args
        assert len(lines) == 1 and lines[0].startswith("mailwarden: ") and str(missing) in lines[0]
