"""The engine's own thread, and the tickets that make every request end.

The engine is not thread-safe, so one background thread owns it (EngineThread): it adds the requests that HTTP
handlers put in its inbox, steps the engine (sleeping while there is no work) and hands each update to its
ticket's asyncio.Queue through `loop.call_soon_threadsafe`; the handlers, on the event loop, read those queues.

A Ticket is one HTTP request's engine requests (n choices x prompts). It is in flight, and counts against
`max_concurrent`, from its creation until `close()`, which every exit path calls exactly once in effect:
the handler's `finally` (success, error, timeout, a client that disconnects), and, for a ticket whose
handler never got to run its `finally` (a streamed response that never started), the reaper on the event loop
at its deadline plus a grace. Closing cancels the ticket's unfinished requests; the engine drops them (and
frees their rows) at its next step. A step that raises past the engine's own per-row isolation ends every
request with an error and empties the engine, which then goes on serving; a thread that dies marks the
worker dead (GET /health answers 503) and ends every ticket. `abort` (a shutdown past its grace) ends every
unfinished request at once with finish_reason "aborted".
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from nanoseek.infer.engine import Engine
from nanoseek.infer.engine import Request as EngineRequest
from nanoseek.infer.engine import Update

log = logging.getLogger(__name__)
REAP_GRACE = 5.0  # seconds past its deadline before the reaper closes a ticket its handler did not close


@dataclass(frozen=True)
class Delta:
    """An engine Update, frozen in the engine thread: its request keeps changing there after the step."""
    request: EngineRequest
    tokens: tuple[int, ...]
    text: str
    logprobs: tuple
    finish_reason: str | None

    @classmethod
    def of(cls, u: Update) -> Delta:
        return cls(u.request, tuple(u.tokens), u.text, tuple(u.logprobs), u.request.finish_reason)


class Ticket:
    """One HTTP request's engine requests and the queue their deltas arrive on."""

    def __init__(self, worker: EngineThread, n: int, deadline: float):
        self.worker, self.n, self.deadline = worker, n, deadline
        self.requests: list[EngineRequest] = []
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.closed = False
        self.created = time.monotonic()

    def close(self) -> None:
        """Release the slot and cancel what has not finished (idempotent; on the event loop)."""
        if self.closed:
            return
        self.closed = True
        self.worker.tickets.discard(self)
        for r in self.requests:
            self.worker.routes.pop(r, None)
            if not r.done:
                r.cancelled = True


class EngineThread:
    """Owns the engine (see the module docstring)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tickets: set[Ticket] = set()  # in flight; used on the event loop
        self.routes: dict[EngineRequest, Ticket] = {}  # engine requests not finished; used on the event loop
        self.alive = True
        self.beat = time.monotonic()  # when the thread last started a step or went idle
        self._inbox: deque[tuple[Ticket, list[list[int]], list, asyncio.Future]] = deque()
        self._wake, self._stopping = threading.Event(), False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def in_flight(self) -> int:
        return sum(t.n for t in self.tickets)

    @property
    def queued(self) -> int:
        """Requests submitted but not yet decoding (the inbox and the engine's waiting list)."""
        return len(self._inbox) + len(self.engine.waiting) + self.engine.inbox.qsize()

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for t in list(self.tickets):
            t.close()

    def ticket(self, n: int, timeout: float) -> Ticket:
        t = Ticket(self, n, time.monotonic() + timeout)
        self.tickets.add(t)
        return t

    async def submit(self, ticket: Ticket, prompts: list[list[int]], params: list) -> None:
        """Add params[i] for prompts[i]; all are added or none (ValueError: one does not fit)."""
        if not self.alive:
            raise RuntimeError("the engine thread has died")
        future = self.loop.create_future()
        self._inbox.append((ticket, prompts, params, future))
        self._wake.set()
        await future

    def abort(self, reason: str) -> None:
        """End every ticket's unfinished requests now with finish_reason "aborted" (the handlers answer 503)
        and cancel them in the engine: what a shutdown does when its grace runs out."""
        for r, ticket in list(self.routes.items()):
            r.cancelled, r.error = True, reason
            ticket.queue.put_nowait(Delta(r, (), "", (), "aborted"))
            self.routes.pop(r)

    def reap(self) -> None:
        """Close the tickets whose handlers are gone past their deadline (see the module docstring)."""
        now = time.monotonic()
        for t in [t for t in self.tickets if now > t.deadline + REAP_GRACE]:
            log.warning("closing a request %.0f s past its deadline", now - t.deadline)
            t.close()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            while not self._stopping:
                self.beat = time.monotonic()
                self._wake.clear()  # cleared before the checks, so a submit() after them wakes the wait below
                while self._inbox:
                    self._add(*self._inbox.popleft())
                if not self.engine.has_work():
                    self._wake.wait(1.0)
                    continue
                try:
                    deltas = [Delta.of(u) for u in self.engine.step()]
                except Exception:  # noqa: BLE001 (the engine isolates rows; this is a failure outside them)
                    log.exception("engine step failed; every request in it ends with an error")
                    deltas = self._fail_all("the engine step failed (see the server log)")
                if deltas:
                    self.loop.call_soon_threadsafe(self._deliver, deltas)
        except BaseException:
            log.exception("the engine thread died")
            self.alive = False
            self.loop.call_soon_threadsafe(self._deliver, self._fail_all("the engine thread has died"))
            raise

    def _add(self, ticket: Ticket, prompts: list[list[int]], params: list, future: asyncio.Future) -> None:
        added = []
        try:  # all fit or none
            for prompt, p in zip(prompts, params):
                added.append(self.engine.add(prompt, p))
            result = added
        except Exception as e:  # noqa: BLE001 (a ValueError is the request's fault; anything else goes back too)
            for r in added:
                r.cancelled = True
            result = e
        self.loop.call_soon_threadsafe(self._settle, ticket, future, result)

    def _settle(self, ticket: Ticket, future: asyncio.Future, result: list[EngineRequest] | ValueError) -> None:
        """On the event loop, before any update of these requests is delivered (callbacks run in order)."""
        if isinstance(result, Exception):
            if not future.cancelled():
                future.set_exception(result)
            return
        ticket.requests = result
        if ticket.closed or future.cancelled():  # the handler left while its requests were in the inbox
            ticket.closed = False
            ticket.close()
        else:
            self.routes.update(dict.fromkeys(result, ticket))
        if not future.cancelled():
            future.set_result(None)

    def _fail_all(self, reason: str) -> list[Delta]:
        """Empty the engine (its rows are reused), ending every request it held with "error"."""
        failed = self.engine.abort_all()
        for r in failed:
            r.finish_reason, r.error = "error", r.error or reason
        return [Delta(r, (), "", (), "error") for r in failed]

    def _deliver(self, deltas: list[Delta]) -> None:
        for d in deltas:
            ticket = self.routes.pop(d.request, None) if d.finish_reason else self.routes.get(d.request)
            if ticket is not None:
                ticket.queue.put_nowait(d)
        if not self.alive:  # nothing will come for the others
            for r, ticket in list(self.routes.items()):
                r.finish_reason, r.error = "error", "the engine thread has died"
                ticket.queue.put_nowait(Delta(r, (), "", (), "error"))
                self.routes.pop(r)

