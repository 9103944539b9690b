"""Surviving faults: preemption notices, dead peers and transient errors.

What TensorFlow 2.21 does, measured by ``tests/test_faults.py``:

* A killed MultiWorkerMirroredStrategy peer aborts the collectives of every
  other worker: they get ``UnavailableError`` within about a second when the
  peer's port refuses, or about 10 s (the coordination service's heartbeat
  timeout) when it does not answer. TensorFlow then says "Restart your
  program to reset": the aborted collective runtime cannot be used again in
  this process, so Model Garden's retry loop around its experiment is not
  enough for this strategy.
* A restarted worker building MultiWorkerMirroredStrategy waits for every
  peer to join, forever by default.
* Vertex AI sends SIGTERM before it takes a VM away; Python's default is to
  die on the spot, losing every step since the last backup.

So, in this module:

* ``install_sigterm_handler`` turns SIGTERM into a flag. The ``Backup``
  callback checks it after every step through ``sigterm_check`` (one
  all-reduce, so that every worker decides at the same step), backs up on
  every worker and raises ``Preempted``.
* ``run_with_restarts`` runs the trainer. The worker that got SIGTERM exits
  with ``PREEMPTED_EXIT_CODE``. After a transient failure (``TRANSIENT_ERRORS``,
  or ``Preempted`` because a *peer* got SIGTERM), a worker with restarts left
  waits until every peer answers again (the platform brings the
  lost one back) and restarts itself in place: it re-executes its own
  command line, so TensorFlow starts afresh and every phase restores from
  its backup, while the platform still sees the same running process.
  ``exit_unless_done_within`` bounds its wait to rejoin the cluster.
* With no restart left, or peers that stay away, the worker exits non-zero
  at once: a job fails fast instead of hanging on a dead worker.
"""

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from typing import Callable, Optional, Sequence, TypeVar

import tensorflow as tf
from absl import logging

from trainer import cluster
from trainer import watchdog

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
        before a restart; past it the worker gives up.

    Returns:
      What ``run`` returns. On a restart this function does not return: the
      process image is replaced; nor when a multi-worker job gives up (the
      process exits with status 1, see ``_give_up``).

    Raises:
      SystemExit: with PREEMPTED_EXIT_CODE when this process got SIGTERM.
      The failure, when it is not transient, or (single worker) when no
      restart is left.
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
    logging.warning("Transient failure: %s: %s", type(failure).__name__, _summary(failure))
    _exit_if_a_peer_is_frozen(peers)
    if restarts >= max_restarts:
        _give_up(failure, f"no restart left (--max_restarts={max_restarts})", peers)
    if not wait_for_peers(peers, wait_seconds):
        _give_up(failure, f"peers {list(peers)} not reachable within {wait_seconds:g} s", peers)
    logging.warning("Restart %d of %d, from the last backups.", restarts + 1, max_restarts)
    restart_in_place(restarts + 1)


def _give_up(failure: BaseException, why: str, peers: Sequence[str]) -> None:
    """Raises ``failure``; in a multi-worker job, logs it and exits at once instead."""
    logging.error("Giving up: %s.", why)
    if not peers:
        raise failure
    # After a lost peer, TensorFlow's own shutdown (its coordination agent and
    # gRPC channels to the dead peer) was measured taking up to 30 s more;
    # the failure is in the log, so leave now.
    logging.error("%s", "".join(traceback.format_exception(failure)))
    _flush_logs()
    os._exit(1)


def wait_for_peers(peers: Sequence[str], timeout: float, interval: float = 0.5) -> bool:
    """Waits until every ``host:port``'s gRPC server answers (watchdog.probe); False on timeout."""
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
    # Its gRPC server answering, not only its port accepting: a frozen process's
    # kernel still completes TCP connections.
    return watchdog.probe(address) == "answers"


def _exit_if_a_peer_is_frozen(peers: Sequence[str]) -> None:
    """Exits with watchdog.STUCK_EXIT_CODE when a peer accepts connections but is silent.

    A frozen peer (SIGSTOP, a hung host) also stops its heartbeats, so
    TensorFlow may abort the collectives before the watchdog trips. An
    in-place restart would then wait for that peer to rejoin, which it never
    does; the job needs the platform's restart, as after the watchdog.
    """
    frozen = [peer for peer in peers if watchdog.probe(peer) == "frozen"]
    if frozen:
        logging.error("Stuck: collectives aborted (a peer stopped sending heartbeats); "
                      "suspect: %s. Exiting with %d; the restarted job resumes from the "
                      "last backup.", ", ".join(f"{p} (frozen)" for p in frozen),
                      watchdog.STUCK_EXIT_CODE)
        exit_now(watchdog.STUCK_EXIT_CODE)


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
        _flush_logs()
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
    _flush_logs()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, cluster.RESTARTS_ENV: str(restarts)})


def exit_now(code: int) -> None:
    """Flushes the logs and ends the process with ``code`` at once, from any thread.

    For a worker whose main thread is blocked inside TensorFlow (no exception
    reaches it) or whose peers are lost (TensorFlow's own shutdown would wait
    for them).
    """
    _flush_logs()
    os._exit(code)


def _flush_logs() -> None:
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()


def _summary(error: BaseException) -> str:
    """The telling line of an error (TensorFlow's start with 'Graph execution error:')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "aborted by" in line), lines[0] if lines else "")
