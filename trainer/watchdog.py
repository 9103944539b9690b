"""Stuck peers: a watchdog on training progress that ends a hung worker.

A peer that is alive but stuck (SIGSTOPped, a hung collective, an input
pipeline wedged on a bad mount) keeps its connections and heartbeats, so
TensorFlow never aborts the others: they wait in their next all-reduce
forever. TensorFlow's own bound, ``CommunicationOptions(timeout_seconds)``,
is one number for every collective, the ones inside a backup and the first
step's (graph tracing and compilation: minutes on a TPU) included, so it
would have to be set for the slowest of those. This watchdog bounds each
wait by what it is:

* **a step** (a train or validation batch): ``max(floor, 10 x the slowest
  step measured so far in this process)``, or ``--watchdog_seconds`` when
  given;
* **a slow window** (the first step of a fit, the turn of an epoch into
  validation and back, a backup): 10 times that.

It is armed inside ``fit`` only (between fits the trainer caches features
or exports, which take as long as they take). On expiry it logs one line
naming the suspect peers (a peer whose gRPC port accepts a connection but
does not answer the HTTP/2 handshake within 2 s is frozen; one that refuses
is gone), and ends the process with ``STUCK_EXIT_CODE``. No backup is taken
then: under MultiWorkerMirroredStrategy a backup is itself a collective that
the stuck peer would hold too, so the last one stands (at most
``--checkpoint_every_steps`` steps are redone after the restart, which is
the platform's: Vertex AI restarts the job's replicas, and every phase
resumes from its backup).

``install`` starts the one watchdog of the process (``trainer/task.py``);
without it, the callback and ``slow_section`` do nothing.
"""

import contextlib
import socket
import threading
import time
from typing import Optional, Sequence

import tf_keras as keras
from absl import logging

# EX_TEMPFAIL (sysexits.h): a temporary failure, worth a restart.
STUCK_EXIT_CODE = 75
SLOW_FACTOR = 10  # A slow window's bound, in step bounds.
STEP_FACTOR = 10  # A step's bound, in slowest steps measured.
_PROBE_SECONDS = 2.0
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


class Watchdog:
    """Measures the time between progress events; ends the process when one is overdue.

    Args:
      floor_seconds: the least step bound.
      fixed_seconds: a fixed step bound instead of the adaptive one; 0: adaptive.
      peers: ``host:port`` of the other workers, probed on expiry.
      on_expiry: called with the log line instead of ending the process (tests).
    """

    def __init__(self, floor_seconds: float, fixed_seconds: float = 0.0,
                 peers: Sequence[str] = (), on_expiry=None):
        self.floor_seconds, self.fixed_seconds = floor_seconds, fixed_seconds
        self.peers = tuple(peers)
        self.slowest_step = 0.0
        self._on_expiry = on_expiry or _exit_stuck
        self._lock = threading.Lock()
        self._armed = False
        self._slow = "start"
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="watchdog")
        self._thread.start()

    def step_bound(self) -> float:
        if self.fixed_seconds > 0:
            return self.fixed_seconds
        return max(self.floor_seconds, STEP_FACTOR * self.slowest_step)

    def bound(self) -> float:
        """The bound on the wait in progress, seconds."""
        return self.step_bound() * (SLOW_FACTOR if self._slow else 1)

    def arm(self) -> None:
        with self._lock:
            self._armed, self._slow, self._last = True, "first step", time.monotonic()

    def disarm(self) -> None:
        with self._lock:
            self._armed = False

    def progress(self) -> None:
        """A step finished (or a slow window ended)."""
        now = time.monotonic()
        with self._lock:
            if not self._slow:
                self.slowest_step = max(self.slowest_step, now - self._last)
            self._slow, self._last = "", now

    def expect_slow(self, what: str) -> str:
        """The wait until the next progress event is a slow window; returns the one it ends."""
        with self._lock:
            previous, self._slow, self._last = self._slow, what, time.monotonic()
        return previous

    def end_slow(self, previous: str) -> None:
        """Ends a slow section: back to the window it interrupted (with a fresh bound), or
        to steps, the section's time not counted as a step's."""
        with self._lock:
            self._slow, self._last = previous, time.monotonic()

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.step_bound() / 10))
            with self._lock:
                waited = time.monotonic() - self._last
                overdue = self._armed and waited > self.bound()
                what = self._slow or "a step"
            if overdue:
                self._on_expiry(self._report(waited, what))
                return

    def _report(self, waited: float, what: str) -> str:
        suspects = [f"{peer} ({state})" for peer in self.peers
                    for state in [probe(peer)] if state != "answers"]
        if suspects:
            who = "suspect: " + ", ".join(suspects)
        elif self.peers:
            who = (f"every peer ({', '.join(self.peers)}) answers: the hang is inside a step "
                   "(a collective, or an input pipeline) on the one that stopped logging")
        else:
            who = "suspect: this worker's own input pipeline or step"
        return (f"Stuck: no training progress for {waited:.1f} s (bound {self.bound():.1f} s, "
                f"waiting for {what}; slowest step {self.slowest_step:.2f} s); {who}. "
                f"Exiting with {STUCK_EXIT_CODE}; the restarted job resumes from the last "
                "backup.")


def probe(address: str) -> str:
    """'answers', 'frozen' (accepts, then silence) or 'unreachable': a peer's gRPC port."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=_PROBE_SECONDS) as sock:
            sock.settimeout(_PROBE_SECONDS)
            sock.sendall(_HTTP2_PREFACE)
            return "answers" if sock.recv(9) else "unreachable"
    except socket.timeout:
        return "frozen"
    except OSError:
        return "unreachable"


def _exit_stuck(line: str) -> None:
    from trainer import recovery  # Its log flushing and exit; imported late, no cycle.

    logging.error("%s", line)
    recovery.exit_now(STUCK_EXIT_CODE)


_current: Optional[Watchdog] = None


def install(floor_seconds: float, fixed_seconds: float, peers: Sequence[str]) -> Optional[Watchdog]:
    """Starts the process's watchdog; a negative ``fixed_seconds`` starts none."""
    global _current
    if fixed_seconds < 0:
        return None
    _current = Watchdog(floor_seconds, fixed_seconds, peers)
    logging.info("Watchdog: a step may take %s; slow windows %d times that.",
                 f"{fixed_seconds:g} s" if fixed_seconds > 0 else
                 f"max({floor_seconds:g} s, {STEP_FACTOR} x the slowest step)", SLOW_FACTOR)
    return _current


def disarm() -> None:
    """Disarms the process's watchdog, if any (outside fit)."""
    if _current is not None:
        _current.disarm()


@contextlib.contextmanager
def slow_section(what: str):
    """Marks the block (a backup) as a slow window, inside a step's or a window's wait."""
    if _current is None:
        yield
        return
    previous = _current.expect_slow(what)
    try:
        yield
    finally:
        _current.end_slow(previous)


class StepWatchdog(keras.callbacks.Callback):
    """Feeds the process's watchdog from a fit: armed inside it, progress at every batch."""

    def __init__(self):
        super().__init__()
        self._supports_tf_logs = True  # Reads no logs: no host sync per step.

    def on_train_begin(self, logs=None):
        if _current:
            _current.arm()

    def on_train_end(self, logs=None):
        if _current:
            _current.disarm()

    def on_train_batch_end(self, batch, logs=None):
        if _current:
            _current.progress()

    on_test_batch_end = on_train_batch_end

    def on_test_begin(self, logs=None):
        if _current:
            _current.expect_slow("the first validation step")

    def on_test_end(self, logs=None):
        if _current:
            _current.expect_slow("the epoch's end and the next epoch's first step")
