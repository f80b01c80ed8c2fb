"""Shared by the component tests: collect a source's events, run a source as a task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from nodemedic.events import Event

# Generous: these bound waits for real daemons and the kernel, they measure nothing.
WAIT = 5.0


class Recorder:
    """The ``emit`` callback a source is given; the test awaits what it emitted, in order."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.source: asyncio.Task[Any] | None = None
        self.seen: list[Event] = []  # everything emitted, consumed or not

    def emit(self, event: Event) -> None:
        self.seen.append(event)
        self.queue.put_nowait(event)

    async def next(self, timeout: float = WAIT) -> Event:
        """The next event; fails early if the source died instead of waiting the whole timeout."""
        getter = asyncio.ensure_future(self.queue.get())
        waiters: set[asyncio.Future[Any]] = {getter}
        if self.source is not None:
            waiters.add(self.source)
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if self.source is not None and self.source in done:
            self.source.result()  # raises the source's error, if any
            raise AssertionError("the source stopped before emitting the expected event")
        raise AssertionError(f"no event within {timeout:g}s")

    async def until(self, matches: Callable[[Event], bool], timeout: float = WAIT) -> Event:
        """Skip events until one matches."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen: list[Event] = []
        while True:
            try:
                event = await self.next(max(0.0, deadline - loop.time()))
            except AssertionError as exc:
                raise AssertionError(f"{exc}; events seen meanwhile: {seen}") from None
            if matches(event):
                return event
            seen.append(event)

    def pending(self) -> list[Event]:
        """What was emitted and not yet taken, without waiting."""
        events = []
        while not self.queue.empty():
            events.append(self.queue.get_nowait())
        return events


async def eventually(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until ``condition()`` holds (checked every few milliseconds), at most ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout:g}s")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(recorder: Recorder, coro: Coroutine[Any, Any, Any]) -> AsyncIterator[asyncio.Task[Any]]:
    """Run a source's ``run()`` for the block; cancel it after, and re-raise anything it raised."""
    task = asyncio.get_running_loop().create_task(coro)
    recorder.source = task
    try:
        yield task
    finally:
        recorder.source = None
        if task.done():
            task.result()
        else:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class ConnectedSystemd:
    """A "dbus" source that says it is connected at once, for daemons whose tests need no systemd."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()

    async def run(self) -> None:
        self.connected.set()
        await asyncio.Future()

    async def close(self) -> None:
        pass
