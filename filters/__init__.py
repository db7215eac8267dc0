"""The filter registry: an explicit, printable map from chain name to class.

``[filters] chain`` in config.toml picks and orders filters by these names; an
unknown name is a config error (exit 2).  ``mailwarden check`` prints the
resolved chain.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Chain name -> the class that implements it.  The modules import their
#: scanners (libmagic, pyclamd, dkimpy, olefile, ...), so they are imported
#: on first use of ``REGISTRY`` (serve, check), not by the CLI commands that
#: never scan mail.
FILTERS: dict[str, str] = {
    "clamav": "filters.clamav:ClamAVFilter",
    "attachment_types": "filters.attachment_types:AttachmentTypesFilter",
    "external_attachments": "filters.external_attachments:ExternalAttachmentsFilter",
    "personal": "filters.personal:PersonalFilter",
    "header_log": "filters.header_log:HeaderLogFilter",
}

REGISTRY: dict[str, type]


def __getattr__(name: str) -> Any:
    if name != "REGISTRY":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    registry: dict[str, type] = {}
    for key, target in FILTERS.items():
        module, cls = target.split(":")
        registry[key] = getattr(importlib.import_module(module), cls)
    globals()["REGISTRY"] = registry
    return registry


__all__ = ["FILTERS", "REGISTRY"]
