"""The stuck-peer watchdog's bounds and its probe, in-process and in a second or two.

Real worker processes, one of them SIGSTOPped, are in tests/test_faults.py.
"""

import socket
import threading
import time

from trainer import watchdog


def _watchdog(floor, **kwargs):
    expired = []
    dog = watchdog.Watchdog(floor, on_expiry=lambda line: expired.append(
        (time.monotonic(), line)), **kwargs)
    return dog, expired


def test_steps_on_time_never_trip_and_a_stall_trips_within_the_bound():
    dog, expired = _watchdog(0.5)
    dog.arm()
    dog.progress()  # The first step (a slow window) is done.
    for _ in range(20):
        time.sleep(0.01)
        dog.progress()
    assert not expired
    assert 0.009 < dog.slowest_step
    bound = dog.bound()
    assert bound == max(0.5, 10 * dog.slowest_step)
    stalled = time.monotonic()
    while not expired and time.monotonic() - stalled < 5:
        time.sleep(0.01)
    assert expired, "never tripped"
    took = expired[0][0] - stalled
    assert bound <= took <= bound + 0.3, took  # The bound, plus about one poll.
    assert "Stuck: no training progress" in expired[0][1]


def test_the_bound_adapts_to_slow_steps_and_slow_windows_get_ten_times_it():
    dog, expired = _watchdog(0.05)
    dog.arm()
    dog.progress()
    time.sleep(0.02)
    dog.progress()
    assert dog.bound() >= 10 * 0.02  # Adapted above the floor.
    previous = dog.expect_slow("a backup")
    assert previous == "" and dog.bound() == watchdog.SLOW_FACTOR * dog.step_bound()
    time.sleep(0.3)  # Longer than a step's bound, within the window's.
    dog.end_slow(previous)
    assert not expired
    assert dog.slowest_step < 0.3  # A window's time is not a step's.
    fixed, _ = _watchdog(0.05, fixed_seconds=7.0)
    assert fixed.bound() == 70.0  # Before the first step: a slow window.


def test_disarmed_between_fits():
    dog, expired = _watchdog(0.05)
    dog.arm()
    dog.progress()
    dog.disarm()
    time.sleep(0.3)
    assert not expired


def test_probe_tells_a_frozen_peer_from_a_live_and_a_gone_one():
    frozen = socket.socket()  # Listens (the kernel completes connections), never answers.
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(1)
    live = socket.socket()
    live.bind(("127.0.0.1", 0))
    live.listen(1)

    def answer():  # As a gRPC server sends its SETTINGS frame.
        connection, _ = live.accept()
        connection.recv(64)
        connection.sendall(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        time.sleep(0.5)
        connection.close()

    threading.Thread(target=answer, daemon=True).start()
    gone = socket.socket()
    gone.bind(("127.0.0.1", 0))
    gone_port = gone.getsockname()[1]
    gone.close()
    try:
        assert watchdog.probe(f"127.0.0.1:{live.getsockname()[1]}") == "answers"
        assert watchdog.probe(f"127.0.0.1:{frozen.getsockname()[1]}") == "frozen"
        assert watchdog.probe(f"127.0.0.1:{gone_port}") == "unreachable"
    finally:
        frozen.close()
        live.close()


def test_after_a_transient_failure_a_frozen_peer_ends_the_worker_with_75(monkeypatch):
    """recovery.py's side: TensorFlow's heartbeat can abort first; a frozen peer still
    means exit 75, and the restart's wait does not take its open port for a live peer."""
    from trainer import recovery

    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(1)
    address = f"127.0.0.1:{frozen.getsockname()[1]}"
    exits = []
    monkeypatch.setattr(recovery, "exit_now", exits.append)
    try:
        assert not recovery.wait_for_peers([address], timeout=0.5, interval=0.1)
        recovery._exit_if_a_peer_is_frozen([address])
    finally:
        frozen.close()
    assert exits == [watchdog.STUCK_EXIT_CODE]
