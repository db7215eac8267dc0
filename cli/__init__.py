"""The ``mailwarden`` command: one click group with every command mounted
explicitly below.

Where each command lives:

* cli/serve.py: ``serve``, ``check`` (the only commands that build the filter
  chain, and so the only ones that import the filters and their scanners);
* cli/quarantine.py: ``quarantine list|show|release|delete|hold|unhold``;
* cli/log.py: ``log export|verify|stats``;
* cli/audit.py: ``audit list``;
* cli/data.py: ``purge``, ``subject-access``, ``erase``;
* cli/store.py: ``store keygen``;
* cli/common.py: what they share (``--config``, :func:`~cli.common.fail`,
  one-line usage errors, the store runner, logging).

gateway/ and quarantine/ never import this package.  Exit status everywhere:
0 success, 1 failure or a check that failed, 2 usage or configuration error
(one line on stderr naming the problem).
"""

from __future__ import annotations

import click

from cli import audit, data, log, quarantine, serve
from cli import store as store_cli
from cli.common import Group, config_option

__all__ = ["main"]


@click.group(cls=Group,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@config_option
@click.version_option(package_name="mailwarden")
@click.pass_context
def main(ctx: click.Context) -> None:
    """mailwarden: an email gateway filter that enforces the organisation's
    email acceptable-use policy inline in the mail flow.

    The MTA hands every message to `mailwarden serve` over SMTP; mailwarden
    scans it (ClamAV), checks attachment true types, warns on external
    attachments, tags personal mail and logs headers only, then relays, holds
    or refuses it.  IT reviews held mail with `mailwarden quarantine`,
    auditors export the log with `mailwarden log export`.
    """
    ctx.ensure_object(dict)


main.add_command(serve.serve)
main.add_command(serve.check)
main.add_command(quarantine.quarantine)
main.add_command(log.log_group)
main.add_command(audit.audit)
main.add_command(data.purge)
main.add_command(data.subject_access)
main.add_command(data.erase)
main.add_command(store_cli.store)
