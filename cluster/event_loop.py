"""The event loop every server process runs on (uvloop when installed). Torch-free, so a router using it never
loads the engine's libraries."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any


def run(coro_factory: Callable[[], Any]) -> int:
    """Run a server coroutine on uvloop when available."""
    try:
        import uvloop

        return int(uvloop.run(coro_factory()))
    except ImportError:
        return int(asyncio.run(coro_factory()))
    finally:
        sys.stdout.flush()
