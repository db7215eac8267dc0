"""``mailwarden store``: the store's own housekeeping.

* ``store keygen PATH``: write a new key-encryption key (KEK) for
  ``[store] key_file`` (docs/crypto-shredding.md): 32 random bytes, mode 0600,
  never over an existing file; prints the key's fingerprint.  It touches no
  kept data, so it runs in the caller's own process
  (``quarantine.access.LOCAL_COMMANDS``) and writes no audit row.
"""

from __future__ import annotations

import click

from cli.common import Command, Group, config_option, fail

__all__ = ["store"]


@click.group(cls=Group)
@config_option
def store() -> None:
    """The store's keys and housekeeping."""


@store.command(cls=Command)
@config_option
@click.argument("path", type=click.Path(dir_okay=False))
def keygen(path: str) -> None:
    """Write a new key-encryption key to PATH (mode 0600; refuses to overwrite)
    for `[store] key_file`, and print its fingerprint.

    Keep it off every backup of the store: whoever has it and a copy of the
    key store can read what was sealed (see docs/crypto-shredding.md)."""
    from quarantine.crypto import write_kek

    try:
        kek = write_kek(path)
    except FileExistsError:
        fail(f"store keygen: {path} exists; refusing to overwrite a key file", 1)
    except OSError as exc:
        fail(f"store keygen: cannot write {path}: {exc.strerror or exc}", 1)
    click.echo(f"wrote {path} (mode 0600); key fingerprint {kek.fingerprint}")
    click.echo("set it as [store] key_file; keep it out of every backup of the store")
