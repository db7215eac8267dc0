"""The store-side commands, mounted on the ``mailwarden`` group by gateway/cli.py.

* ``quarantine/cli_log.py``: ``log export|verify|stats`` (auditors).
* ``quarantine/cli_review.py``: ``quarantine ...``, ``audit list``, ``purge``,
  ``subject-access``, ``erase`` (IT and the data protection officer).
"""

from __future__ import annotations

import click


def register(main: click.Group) -> None:
    from quarantine import cli_log, cli_review

    for command in (*cli_log.COMMANDS, *cli_review.COMMANDS):
        main.add_command(command)
