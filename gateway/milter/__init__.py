"""The milter (protocol v6) front end (docs/milter.md).

``codec.py`` (wire format, no I/O), ``api.py`` (the handler seam:
``MilterMessage`` -> ``MilterAnswer``), ``session.py`` (one state machine per
MTA connection), ``actions.py`` (answers and header diffs as milter
requests), ``server.py`` (``start_milter``: the listener).
"""

from gateway.milter.api import Handler, MilterAnswer, MilterMessage
from gateway.milter.server import MilterServer, start_milter

__all__ = ["Handler", "MilterAnswer", "MilterMessage", "MilterServer", "start_milter"]
