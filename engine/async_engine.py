"""Runs an LLMEngine on its own thread and lets asyncio code stream from it.

The engine is not thread-safe and its step is a long blocking call, so one thread owns it: every operation (add,
abort, reserve, admit, release, stats) is a command executed on that thread between steps, and outputs are handed to
each request's asyncio queue with call_soon_threadsafe. A consumer that stops iterating (client cancelled) aborts its
request, which frees its blocks.

A request that fails inside the engine (LLMEngine.take_failures) ends its own stream with RequestFailedError; the
others go on. Only when the engine thread itself dies (EngineBrokenError, or a bug outside any one request) does
every stream get EngineStopped; `fatal_error` then says why and `wait_fatal()` returns, so the node can stop.

A step observer (power accounting) is told after every step, before its outputs are delivered, how long the step took
and how many tokens it computed for which request, so a request's charges are complete when its last output arrives.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol, TypeVar

from engine.engine import EngineLoad, LLMEngine, RequestOutput
from engine.errors import EngineError, RequestFailedError
from engine.sampling_params import SamplingParams

T = TypeVar("T")

# How long the idle loop sleeps between checks for commands; bounds shutdown latency too.
_IDLE_WAIT_S = 0.05


class EngineStopped(EngineError):
    """The engine thread has stopped (shutdown or a fatal error); no more work is accepted."""


@dataclass(frozen=True, slots=True)
class StepTiming:
    """One engine step as power accounting sees it: how long it took and which tokens it computed for whom."""

    started_s: float  # time.monotonic() when the step began
    wall_s: float
    prompt_tokens: dict[str, int]  # request id -> prompt (or recomputed context) tokens computed in the step
    decode_tokens: dict[str, int]  # request id -> 1 for each sequence that decoded a token in the step


class StepObserver(Protocol):
    def observe_step(self, step: StepTiming) -> None: ...


class AsyncEngine:
    def __init__(
        self, engine: LLMEngine, name: str = "engine", step_observer: StepObserver | None = None
    ) -> None:
        self.engine = engine
        # Called on the engine thread after every step; its errors stop the engine like any other bug.
        self.step_observer = step_observer
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._stopped = threading.Event()
        self._fatal: BaseException | None = None
        self._wake = threading.Event()
        # Replaced (never mutated) by the engine thread after every loop turn, so other threads read it safely.
        self.load: EngineLoad = engine.load()
        # Monotonic time the step in progress began; None between steps. Read by the node's progress watch from
        # another thread (a float assignment is atomic). The first step is left out: it includes warm-up.
        self.step_started: float | None = None
        self._steps_done = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- asyncio side --------------------------------------------------------------------------------------------

    async def call(self, fn: Callable[[LLMEngine], T], timeout_s: float = 30.0) -> T:
        """Run fn(engine) on the engine thread between steps and return its result (or raise its exception)."""
        future: Future[T] = Future()

        def command() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except BaseException as exc:  # handed to the caller, who decides
                    future.set_exception(exc)

        self._submit(command)
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)

    def open_stream(self, request_id: str) -> RequestStream:
        """Register for request_id's outputs before the request can produce any (then add or admit it)."""
        stream = RequestStream(self, request_id, asyncio.get_running_loop())
        self._streams[request_id] = stream
        return stream

    async def prepare(self, params: SamplingParams) -> None:
        """Compile the request's output constraint (or find it cached) on a worker thread, so that adding the
        request later never makes an engine step wait for a compile (a JSON schema can take a second)."""
        if params.structured is not None:
            await asyncio.to_thread(self.engine.intake.grammars.compile, params.structured)

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        prior_output: list[int] | None = None,
        keep_local: bool = False,
    ) -> RequestStream:
        """Add a request and return its output stream. Bad input raises here, before any output."""
        stream = self.open_stream(request_id)
        try:
            await self.call(lambda e: e.add_request(request_id, prompt, params, prior_output, keep_local))
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the loop after the current step; pending streams get EngineStopped."""
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout_s)
        if not self._thread.is_alive():  # no step can run any more: the other tensor-parallel ranks may go
            self.engine.close()

    @property
    def open_streams(self) -> int:
        """Streams whose consumer has not read the final output yet (it may still be relaying earlier ones)."""
        return len(self._streams)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    # ---- engine thread -------------------------------------------------------------------------------------------

    def _submit(self, command: Callable[[], None]) -> None:
        if self._stopped.is_set():
            raise EngineStopped(f"engine stopped{f': {self._fatal}' if self._fatal else ''}")
        self._commands.put(command)
        self._wake.set()

    @property
    def fatal_error(self) -> BaseException | None:
        """What killed the engine thread; None while it runs and after a plain shutdown."""
        return self._fatal

    async def wait_fatal(self, poll_s: float = 0.1) -> BaseException:
        """Return once the engine thread has died of an error (never after a plain shutdown)."""
        while self._fatal is None or self._thread.is_alive():
            await asyncio.sleep(poll_s)
        return self._fatal

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                self._drain_commands()
                if self.engine.has_unfinished():
                    self.step_started = time.monotonic() if self._steps_done else None
                    outputs = self._step()
                    self.step_started = None
                    self._steps_done += 1
                    self._deliver(outputs)
                    self._fail_each(self.engine.take_failures())
                    self.load = self.engine.load()
                else:
                    self.load = self.engine.load()
                    self.engine.check_ranks()  # a tensor-parallel rank that died while idle stops the engine now
                    self._wake.wait(_IDLE_WAIT_S)
                    self._wake.clear()
        except BaseException as exc:  # a bug or a device failure: fail every stream instead of hanging them
            self._fatal = exc
            self._stopped.set()
        finally:
            self._drain_commands()
            self._fail_all(EngineStopped(f"engine stopped{f': {self._fatal}' if self._fatal else ''}"))

    def _step(self) -> list[RequestOutput]:
        observer = self.step_observer
        if observer is None:
            return self.engine.step()
        started = time.monotonic()
        outputs = self.engine.step()
        work = self.engine.last_step
        observer.observe_step(
            StepTiming(started, time.monotonic() - started, work.prompt_tokens, work.decode_tokens)
        )
        return outputs

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _fail_each(self, failures: list[RequestFailedError]) -> None:
        for failure in failures:
            stream = self._streams.get(failure.request_id)
            if stream is not None:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, failure)

    def _fail_all(self, exc: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)


class RequestStream:
    """One request's outputs as an async iterator; closing it before the request finished aborts the request."""

    def __init__(self, owner: AsyncEngine, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._owner = owner
        self._finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self._finished = True
            self._owner._streams.pop(self.request_id, None)
            raise item
        if item.finished:
            self._finished = True
            self._owner._streams.pop(self.request_id, None)
        return item

    def close(self) -> None:
        """Stop listening; abort the request on the engine unless it already finished. Safe to call twice."""
        if self._owner._streams.pop(self.request_id, None) is not None and not self._finished:
            self._finished = True
            if not self._owner._stopped.is_set():
                self._owner._submit(lambda: self._owner.engine.abort(self.request_id))
