"""The milter (protocol v6) front end.  Phase 1, partial: the codec and the handler interface.

Still to come: session.py (per-connection state machine), actions.py (edits as
milter modification requests), server.py (``start_milter``).
"""

from gateway.milter.api import Handler, MilterAnswer, MilterMessage

__all__ = ["Handler", "MilterAnswer", "MilterMessage"]
