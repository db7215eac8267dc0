"""The filter registry: an explicit, printable map from chain name to class.

``[filters] chain`` in config.toml picks and orders filters by these names; an
unknown name is a config error (exit 2).  ``mailwarden check`` prints the
resolved chain.
"""

from __future__ import annotations

from filters.attachment_types import AttachmentTypesFilter
from filters.clamav import ClamAVFilter
from filters.external_attachments import ExternalAttachmentsFilter
from filters.header_log import HeaderLogFilter
from filters.personal import PersonalFilter

REGISTRY: dict[str, type] = {
    ClamAVFilter.name: ClamAVFilter,
    AttachmentTypesFilter.name: AttachmentTypesFilter,
    ExternalAttachmentsFilter.name: ExternalAttachmentsFilter,
    PersonalFilter.name: PersonalFilter,
    HeaderLogFilter.name: HeaderLogFilter,
}

__all__ = ["REGISTRY"]
