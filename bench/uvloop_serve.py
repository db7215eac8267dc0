"""Run the ``mailwarden`` CLI on uvloop (benchmark only).

mailwarden itself runs on asyncio's default loop; this wrapper installs
uvloop's event loop policy first so the benchmark can measure what uvloop
would change:

    python bench/uvloop_serve.py serve --config bench.toml
"""

from __future__ import annotations

import asyncio

import uvloop

asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

from cli import main  # noqa: E402  (the policy must be in place first)

if __name__ == "__main__":
    main()
