"""A settable clock for the store and the pipeline (the clock is injected)."""

from __future__ import annotations

from datetime import datetime


class Clock:
    """Returns ``now``; a test moves it by assigning ``clock.now``."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now
