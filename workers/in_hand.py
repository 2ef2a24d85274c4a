"""The entries a worker holds (read, not yet committed), kept from peers' claims while it works on them.

A batch slower than ``streams.claim_idle_ms`` (the full model on an overloaded host; a sink's overlays on a stalled
disk) was claimed by a peer, or by the worker's own claims, and handled again, and one slower than the heartbeat's
TTL (15 s) turned /healthz 503, though the worker was only slow. While entries are held, ``InHand``'s thread resets
their idle time every ``min(claim_idle_ms, heartbeat TTL) / 3`` (``StreamClient.keep_claimed``: only those still
pending on this worker, so an entry a peer has claimed is never taken back) and refreshes the heartbeat. It does so
only while the worker makes progress: once the worker has spent ``worker.max_batch_duration_s`` on one step (a hung
model, a hung disk; counted from the step's start, or from when entries came in hand after none were) it stops, so
the claims take the entries ``claim_idle_ms`` later and a worker whose loop is stuck in that step turns /healthz and
/livez 503; if the step is still running then, the keeper ends the process (``Heartbeat.exit_if_hung``: exit status 3,
so that systemd and Compose restart it too), leaving the entries pending. A killed worker's thread dies with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from types import TracebackType

from workers.lifecycle import WorkerRuntime, keeper_join_s

logger = logging.getLogger(__name__)


class InHand:
    """Entry ids of ``stream`` held by ``runtime.name`` in ``group``; a context manager running the keeping thread."""

    def __init__(self, runtime: WorkerRuntime, stream: str, group: str, max_step_s: float) -> None:
        if max_step_s <= 0:
            msg = f"max_step_s must be > 0 (worker.max_batch_duration_s), got {max_step_s}"
            raise ValueError(msg)
        self.runtime, self.stream, self.group = runtime, stream, group
        self.max_step_s = max_step_s
        self.interval_s = min(runtime.config.streams.claim_idle_ms / 1000.0, runtime.heartbeat.ttl_s) / 3.0
        self._held: dict[str, None] = {}  # an ordered set
        self._step_started = time.monotonic()
        self._gave_up = False
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keep-in-hand", daemon=True)

    def hold(self, entry_ids: Iterable[str]) -> None:
        with self._lock:
            if not self._held:  # a step's time in hand counts from here, not from a step begun while idle
                self._step_started = time.monotonic()
            self._held.update(dict.fromkeys(entry_ids))

    def release(self, entry_ids: Iterable[str]) -> None:
        """Stop keeping ``entry_ids`` (committed: acknowledged, or found already committed)."""
        with self._lock:
            for entry_id in entry_ids:
                self._held.pop(entry_id, None)

    def step(self) -> None:
        """The worker starts a step (a loop turn, a batch): it is making progress."""
        with self._lock:
            self._step_started = time.monotonic()
            if self._gave_up:
                self._gave_up = False
                logger.warning("the step taken for hung has ended", extra={"stream": self.stream})

    def hung(self) -> bool:
        """Whether entries are held and the current step has taken longer than ``max_step_s`` (taken for hung): a
        loop that goes on while another thread holds them (a sink's, while its writer is stuck) then stops beating
        too, so the worker turns unhealthy as one stuck in that step does."""
        with self._lock:
            return bool(self._held) and time.monotonic() - self._step_started > self.max_step_s

    def keep(self) -> None:
        """One round: reset the held entries' idle time and refresh the heartbeat, unless nothing is held or the
        current step has taken longer than ``max_step_s``."""
        with self._lock:
            held, step_s = list(self._held), time.monotonic() - self._step_started
            if not held:
                return
            hung = step_s > self.max_step_s
            still_hung = hung and self._gave_up
            self._gave_up = hung
        if still_hung:
            what = f"a step on {self.stream} (worker.max_batch_duration_s)"
            self.runtime.heartbeat.exit_if_hung(what, step_s=round(step_s, 1), max_s=self.max_step_s, held=len(held))
            return
        if hung:
            logger.error(
                "a step has taken longer than worker.max_batch_duration_s: taken for hung, its entries are left to "
                "peers' claims and the heartbeat stops",
                extra={"stream": self.stream, "step_s": round(step_s, 1), "max_s": self.max_step_s, "held": len(held)},
            )
            return
        taken = self.runtime.client.keep_claimed(self.stream, self.group, self.runtime.name, held)
        if taken:  # kept too late (this process stalled past claim_idle_ms), and a claim page need not match this
            # batch. Committing a batch none of whose entries is still pending (and still in the stream) appends
            # nothing; one still holding some appends results and dead letters only for the entries it acknowledged
            # (StreamClient.commit), not for those the peer committed or, trimmed, dead-lettered
            self.release(taken)
            logger.warning("entries in hand were claimed by a peer",
                           extra={"stream": self.stream, "count": len(taken), "first": taken[0]})  # fmt: skip
        self.runtime.heartbeat.refresh(in_hand=len(held) - len(taken), busy_s=round(step_s, 1))

    def _run(self) -> None:
        while not self._closed.wait(self.interval_s):
            try:
                self.keep()
            except Exception as error:  # an outage past the drain deadline, or a Redis error: try again next round
                logger.warning("could not keep the entries in hand", extra={"error": str(error)[:500]})

    def __enter__(self) -> InHand:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._closed.set()
        self._thread.join(timeout=keeper_join_s(self.runtime.config))
