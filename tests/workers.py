"""A launcher of real trainer processes: ``python -m trainer.task`` on this machine.

A ``Job`` starts one trainer per worker, each with its own ``TF_CONFIG``
naming every worker at a free port on 127.0.0.1 (MultiWorkerMirroredStrategy
with one worker per process), or a single process without ``TF_CONFIG``.
Every worker must know every port before any binds its own, so a port can
be taken by another process in between: a cluster whose gRPC server could
not start is started again on new ports (``Job.start``).
Each process's output is read on a thread into timestamped lines, so a test
can wait for a line, send a signal the moment it appears, and measure how long
anything took. Every wait is bounded, and ``Job`` is a context manager that
kills whatever is still running when the test ends, however it ends.
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WaitTimeout(AssertionError):
    """A bounded wait ran out; the message ends with the process's last lines."""


START_WAIT = 240  # Seconds for a cluster to form on a loaded 2-core machine.
ATTEMPTS = 3  # Cluster starts tried when a port was taken meanwhile.
_PORT_TAKEN = "Could not start gRPC server"


def free_ports(count: int) -> List[int]:
    """Ports free on 127.0.0.1 right now (held open together, so distinct)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports: Sequence[int], index: int) -> str:
    """TF_CONFIG of worker ``index`` in a cluster of workers (worker 0 is chief)."""
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


class Worker:
    """One trainer process and its output, read line by line on a thread."""

    def __init__(self, name: str, args: Sequence[str], env: dict, log_path: str):
        self.name = name
        self.started = time.monotonic()
        self.lines: List[tuple] = []  # (monotonic time, text)
        self._log = open(log_path, "a")
        self._log.write(f"==== {name}: {' '.join(args)}\n")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trainer.task", *args], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)  # Its own group: a signal reaches it alone.
        self._new_line = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self._log.write(line)
            with self._new_line:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._new_line.notify_all()
        self._log.flush()
        with self._new_line:
            self._new_line.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(text for _, text in self.lines)

    def tail(self, count: int = 40) -> str:
        return "\n".join(text for _, text in self.lines[-count:])

    def wait_for(self, pattern: str, timeout: float, start: int = 0):
        """Waits for a line matching the regex ``pattern``; returns (time, match).

        Raises WaitTimeout if none appears within ``timeout`` seconds, or the
        process ends first.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self._new_line:
            while True:
                while index < len(self.lines):
                    found = regex.search(self.lines[index][1])
                    if found:
                        return self.lines[index][0], found
                    index += 1
                done = self.process.poll() is not None and not self._reader.is_alive()
                left = deadline - time.monotonic()
                if done or left <= 0:
                    why = (f"exited with {self.process.returncode}" if done
                           else f"no match within {timeout:.0f} s")
                    raise WaitTimeout(f"{self.name}: {pattern!r}: {why}.\n{self.tail()}")
                self._new_line.wait(min(left, 1.0))

    def matches(self, pattern: str) -> list:
        """Every match of the regex ``pattern`` in the output so far."""
        regex = re.compile(pattern)
        return [m for _, text in self.lines for m in [regex.search(text)] if m]

    def signal(self, signum: int) -> float:
        """Sends ``signum``; returns when it was sent."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        """Waits for the process to end; returns its exit code."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(f"{self.name}: still running after {timeout:.0f} s.\n"
                              f"{self.tail()}") from None
        self._reader.join(timeout=10)
        return code

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=30)
        finally:
            self._reader.join(timeout=10)
            self._log.close()


class Job:
    """One run of the trainer: ``num_workers`` processes with the same flags.

    Args:
      args: trainer flags.
      num_workers: 1 runs one process without TF_CONFIG; more run a
        MultiWorkerMirroredStrategy cluster of that many workers.
      log_path: every process's output is appended here.
    """

    def __init__(self, args: Sequence[str], num_workers: int, log_path: str):
        self.args = list(args)
        self.num_workers = num_workers
        self.log_path = log_path
        self.workers: List[Worker] = []

    def start(self) -> "Job":
        """Starts the processes; a cluster returns once every worker has its strategy."""
        self.started = time.monotonic()
        for attempt in range(1, ATTEMPTS + 1):
            self._ports = free_ports(self.num_workers) if self.num_workers > 1 else []
            self.workers = [self._launch(index) for index in range(self.num_workers)]
            if not self._ports or self._cluster_formed(last_attempt=attempt == ATTEMPTS):
                return self
            self.kill()
        raise AssertionError("unreachable")

    def _cluster_formed(self, last_attempt: bool) -> bool:
        """Waits until every worker has built its strategy; False when a port was taken."""
        for worker in self.workers:
            try:
                worker.wait_for(r"Strategy multi_worker", START_WAIT)
            except WaitTimeout:
                if _PORT_TAKEN in worker.output and not last_attempt:
                    return False
                raise
        return True

    def restart(self, index: int) -> Worker:
        """Starts worker ``index`` again (as the platform restarts a lost replica)."""
        self.workers[index].kill()
        self.workers[index] = self._launch(index)
        return self.workers[index]

    def _launch(self, index: int) -> Worker:
        env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
        env.pop("TF_CONFIG", None)
        if self._ports:
            env["TF_CONFIG"] = tf_config(self._ports, index)
        return Worker(f"worker {index}", self.args, env, self.log_path)

    def __enter__(self) -> "Job":
        return self.start()

    def __exit__(self, *exc_info):
        self.kill()

    @property
    def chief(self) -> Worker:
        return self.workers[0]

    def signal(self, signum: int, indices: Optional[Sequence[int]] = None) -> float:
        """Sends ``signum`` to the given workers (all by default), returns when."""
        indices = range(self.num_workers) if indices is None else indices
        return min(self.workers[i].signal(signum) for i in indices)

    def wait(self, timeout: float) -> List[int]:
        """Waits for every process (``timeout`` seconds in all); returns exit codes."""
        deadline = time.monotonic() + timeout
        return [w.wait(max(1.0, deadline - time.monotonic())) for w in self.workers]

    def kill(self):
        for worker in self.workers:
            worker.kill()

