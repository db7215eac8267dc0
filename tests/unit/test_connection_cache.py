"""ConnectionCache's bookkeeping with stand-in clients and an injected clock
(the real connections are tests/integration/test_next_hop_cache.py)."""

from __future__ import annotations

import asyncio

from gateway.relay import ConnectionCache

KEY = ("127.0.0.1", 10026, "mailwarden.test")


class FakeProtocol:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class FakeClient:
    def __init__(self) -> None:
        self.protocol = FakeProtocol()
        self.is_connected = True

    def close(self) -> None:
        self.is_connected = False

    @property
    def quit_said(self) -> bool:
        return self.protocol.written == [b"QUIT\r\n"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(coro)


def test_take_gives_the_most_recently_idle_live_connection() -> None:
    async def go() -> None:
        clock = Clock()
        cache = ConnectionCache(2.0, clock=clock)
        a, b = FakeClient(), FakeClient()
        cache.give(KEY, a, clock.now)
        cache.give(KEY, b, clock.now)
        assert cache.take(KEY) == (b, clock.now)
        b2 = FakeClient()
        b2.is_connected = False  # the next hop closed it while idle
        cache.give(KEY, b2, clock.now)  # not kept: already gone
        assert cache.take(KEY) == (a, clock.now)
        assert cache.take(KEY) is None
        assert cache.take(("other", 25, "x")) is None
        assert cache.reused == 2
        cache.close()

    run(go())


def test_idle_connections_expire_and_are_quit() -> None:
    async def go() -> None:
        clock = Clock()
        cache = ConnectionCache(0.05, clock=clock)
        old, new = FakeClient(), FakeClient()
        cache.give(KEY, old, clock.now)
        clock.now += 0.04
        cache.give(KEY, new, clock.now)
        clock.now += 0.02  # old idle 0.06 s, new 0.02 s
        cache._expire()
        assert old.quit_said and not old.is_connected
        assert new.is_connected and cache.idle_count() == 1
        clock.now += 1
        cache._expire()
        assert new.quit_said and cache.idle_count() == 0

    run(go())


def test_limits_off_and_close() -> None:
    async def go() -> None:
        clock = Clock()
        cache = ConnectionCache(2.0, clock=clock, max_idle=2, max_age=300)
        clients = [FakeClient() for _ in range(3)]
        for c in clients:
            cache.give(KEY, c, clock.now)
        assert cache.idle_count() == 2 and clients[2].quit_said  # over max_idle
        aged = FakeClient()
        cache.give(KEY, aged, clock.now - 301)  # opened too long ago
        assert aged.quit_said
        cache.idle_time = 0  # a reload turned it off: nothing is reused
        assert cache.take(KEY) is None
        assert all(c.quit_said for c in clients)
        cache.idle_time = 2.0
        kept = FakeClient()
        cache.give(KEY, kept, clock.now)
        cache.close()
        assert kept.quit_said
        late = FakeClient()
        cache.give(KEY, late, clock.now)  # after close: never kept
        assert late.quit_said and cache.idle_count() == 0

    run(go())
