"""Surviving faults: preemption notices, dead peers and transient errors.

What TensorFlow 2.21 does, measured by ``tests/test_faults.py``:

* A killed MultiWorkerMirroredStrategy peer aborts the collectives of every
  other worker: they get ``UnavailableError`` within a second when the peer's
  port refuses, or within about 10 s (the coordination service's heartbeat
  timeout) when its host vanishes. TensorFlow then says "Restart your program
  to reset": the aborted collective runtime cannot be used again in this
  process, so an in-process retry (Model Garden's loop around its experiment)
  is not enough for this strategy.
* Vertex AI sends SIGTERM before it takes a VM away. Python's default is to
  die on the spot, losing every step since the last backup.

So, in this module:

* ``install_sigterm_handler`` turns SIGTERM into a flag. The ``Backup``
  callback (``callbacks.py``) checks it after every step, agrees with the
  other workers (one all-reduce), backs up on every worker at that very step
  and raises ``Preempted``.
* ``run_with_restarts`` runs the trainer. The worker that got SIGTERM exits
  with ``PREEMPTED_EXIT_CODE``. On a transient failure (``TRANSIENT_ERRORS``,
  or ``Preempted`` because a *peer* was preempted) a worker with restarts
  left waits until every peer accepts connections again (the platform
  restarts the lost one) and then restarts itself in place: it re-executes
  its own command line, so TensorFlow starts afresh and every phase restores
  from its backup. The count of restarts travels to the new image in
  ``cluster.RESTARTS_ENV``. When no restarts are left, or the peers stay away past
  the wait, the error is raised and the process exits non-zero: a job never
  hangs on a dead worker.
"""

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional, Sequence, TypeVar

import tensorflow as tf
from absl import logging

from trainer import cluster

# The errors of a lost peer or of a storage or network hiccup: worth a
# restart from the last backup. Anything else (a bug, a NaN loss, a missing
# file) would only fail the same way again.
TRANSIENT_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                    tf.errors.AbortedError)
# 128 + SIGTERM, what a shell reports for a process that SIGTERM ended.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM

_sigterm = threading.Event()

T = TypeVar("T")


class Preempted(Exception):
    """Training stopped after a backup because a worker got SIGTERM."""

    def __init__(self, here: bool, epoch: int, step: int):
        self.here = here  # This process got the SIGTERM (else a peer did).
        who = "this worker" if here else "a peer"
        super().__init__(f"SIGTERM to {who}: backed up at epoch {epoch + 1}, step {step + 1}.")


def install_sigterm_handler() -> None:
    """Turns SIGTERM into a flag that the Backup callback acts on.

    Call from the main thread. Until the flag is acted on (the next training
    step) the process keeps running, so work outside ``fit`` (export,
    evaluation) finishes unless the platform kills the process after its
    grace period.
    """
    def handle(signum, frame):
        del frame
        logging.warning("Got signal %d: backing up at the next step, then stopping.", signum)
        _sigterm.set()

    signal.signal(signal.SIGTERM, handle)


def sigterm_received() -> bool:
    """Whether this process got SIGTERM since install_sigterm_handler."""
    return _sigterm.is_set()


def sigterm_check(strategy: tf.distribute.Strategy) -> Callable[[], bool]:
    """A function telling whether any worker got SIGTERM; every worker must call it together.

    SIGTERM reaches one worker, but a backup under MultiWorkerMirroredStrategy
    runs on every worker (the save reads synchronized variables), so all
    must decide at the same step: one all-reduce of the flags per call. A
    single process needs only its own flag.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return sigterm_received

    @tf.function
    def count(flag):
        per_replica = strategy.run(tf.identity, args=(flag,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return lambda: bool(count(tf.constant(float(sigterm_received()))) > 0)


def run_with_restarts(run: Callable[[], T], max_restarts: int, restarts: int,
                      peers: Sequence[str], wait_seconds: float) -> T:
    """Runs ``run()``; after a transient failure, restarts this process in place.

    Args:
      run: the trainer; it resumes from its backups when run again.
      max_restarts: restarts allowed in all (over every in-place restart).
      restarts: restarts so far (``ClusterInfo.restarts``).
      peers: ``host:port`` of the other workers; empty for a single worker.
      wait_seconds: how long to wait for every peer to accept connections
        before a restart; past it the failure is raised.

    Returns:
      What ``run`` returns. On a restart this function does not return: the
      process image is replaced.

    Raises:
      SystemExit: with PREEMPTED_EXIT_CODE when this process got SIGTERM.
      The failure, when it is not transient or no restart is left.
    """
    if restarts:
        logging.warning("In-place restart %d of %d: resuming from the backups.", restarts,
                        max_restarts)
    try:
        return run()
    except Preempted as e:
        if e.here:
            logging.warning("%s Exiting with %d.", e, PREEMPTED_EXIT_CODE)
            raise SystemExit(PREEMPTED_EXIT_CODE) from None
        failure = e
    except TRANSIENT_ERRORS as e:
        failure = e
    if restarts >= max_restarts:
        logging.error("Transient failure and no restart left (--max_restarts=%d).", max_restarts)
        raise failure
    logging.warning("Transient failure (%s: %s); restart %d of %d from the last backup.",
                    type(failure).__name__, _first_line(failure), restarts + 1, max_restarts)
    if not wait_for_peers(peers, wait_seconds):
        logging.error("Peers %s not reachable within %.0f s; giving up.", list(peers),
                      wait_seconds)
        raise failure
    restart_in_place(restarts + 1)


def wait_for_peers(peers: Sequence[str], timeout: float, interval: float = 0.5) -> bool:
    """Waits until every ``host:port`` accepts a TCP connection; False on timeout."""
    deadline = time.monotonic() + timeout
    waiting = list(peers)
    # A peer killed a moment ago may still hold its port while it dies.
    time.sleep(interval if waiting else 0)
    while waiting:
        waiting = [p for p in waiting if not _accepts(p)]
        if not waiting:
            break
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def _accepts(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def exit_unless_done_within(seconds: Optional[float], what: str):
    """Ends the process (exit status 1) if the block takes longer than ``seconds``.

    For waits TensorFlow does not bound: a restarted worker building
    MultiWorkerMirroredStrategy waits for every peer to join, forever by
    default. None: no limit.
    """
    if seconds is None:
        yield
        return

    def give_up():
        logging.error("%s took over %.0f s; exiting.", what, seconds)
        logging.flush()
        os._exit(1)  # The main thread is blocked inside TensorFlow: no exception reaches it.

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def restart_in_place(restarts: int) -> None:
    """Re-executes this process's own command line, with ``restarts`` in RESTARTS_ENV.

    Same process id and container, fresh Python and TensorFlow: the platform
    sees a worker that is still running.
    """
    logging.warning("Restarting in place: %s", " ".join(sys.orig_argv))
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, cluster.RESTARTS_ENV: str(restarts)})


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
