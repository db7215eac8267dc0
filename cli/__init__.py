"""The ``mailwarden`` command: one click group with every command mounted
explicitly below.

Where each command lives:

* cli/serve.py: ``serve``, ``check`` (the only commands that build the filter
  chain, and so the only ones that import the filters and their scanners),
  ``reload`` (asks the running daemon through the control socket);
* cli/quarantine.py: ``quarantine list|show|release|delete|hold|unhold``;
* cli/log.py: ``log export|verify|stats``;
* cli/audit.py: ``audit list``;
* cli/data.py: ``purge``, ``subject-access``, ``erase``;
* cli/access.py: ``access request|approve|deny|list`` (two-person approval)
  and the ``--ground``/``--case`` options;
* cli/store.py: ``store keygen``;
* cli/client.py and cli/control.py: the control socket (``[access]``): the
  client that forwards a command to ``serve``, and the server ``serve``
  runs, which checks the caller's role and runs the command in-process;
* cli/common.py: what they share (``--config``, :func:`~cli.common.fail`,
  one-line usage errors, the store runner, logging).

gateway/ and quarantine/ never import this package.  Exit status everywhere:
0 success, 1 failure or a check that failed, 2 usage or configuration error
(one line on stderr naming the problem).
"""

from __future__ import annotations

import click

from cli import access, audit, data, log, quarantine, serve
from cli import store as store_cli
from cli.common import Group, config_option

__all__ = ["main"]


class RootGroup(Group):
    """The ``mailwarden`` group: with ``[access]`` in the config, a command on
    kept data is sent to the running daemon's control socket instead of
    being run here (cli/client.py); in the daemon (a control request) and
    without ``[access]`` it runs in this process."""

    def invoke(self, ctx: click.Context) -> object:
        if not ctx.ensure_object(dict).get("control_request"):
            from cli.client import maybe_forward

            maybe_forward(self, ctx)
        return super().invoke(ctx)


@click.group(cls=RootGroup,
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
main.add_command(serve.reload_cmd)
main.add_command(quarantine.quarantine)
main.add_command(log.log_group)
main.add_command(audit.audit)
main.add_command(data.purge)
main.add_command(data.subject_access)
main.add_command(data.erase)
main.add_command(access.access)
main.add_command(store_cli.store)
