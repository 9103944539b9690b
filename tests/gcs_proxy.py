"""The Cloud Storage emulator's TLS proxy and its fake-gcs-server, in their own process.

Run as a script by :class:`gcs_emulator.GcsEmulator` (tests/gcs_emulator.py
explains why TF's gs:// needs a CONNECT proxy at all). It starts
fake-gcs-server on a free port (tests/gcs_server.py), accepts curl's ``CONNECT`` for the Google
storage hosts on 127.0.0.1, terminates TLS with the emulator's throwaway
certificate and forwards each request to the server, injecting the faults
of tests/gcs_faults.py. Each line on stdin is a command (set or clear fault
rules, read the counts), answered by one line of JSON on stdout; EOF stops
both servers.

The proxy also smooths over what the Go server and TF's curl disagree on:
it drops ``Transfer-Encoding: identity`` on empty POST/PUT (the server
answers 501), decodes chunked upload bodies, answers ``Expect:
100-continue`` at once (else curl waits a second per upload), turns the
``http://`` upload-session URLs the server hands out into ``https://`` ones
(curl would send those past the proxy), answers
``GET /storage/v1/b/<bucket>/storageLayout`` (asked on directory renames,
unknown to the server), and sets TCP_NODELAY (else about 40 ms per request
from Nagle's algorithm meeting delayed ACKs). It refuses CONNECT to any
other host, so nothing else in the process ever meets the throwaway CA. An
optional per-request ``delay_s`` models the latency to first byte of the
real service.

**Faults.** The proxy injects the errors Cloud Storage gives at scale (429,
500, 503, connection resets mid-body, slow replies; tests/gcs_faults.py)
into requests by kind and rate, deterministically by seed:
:meth:`GcsEmulator.faults` (or ``set_faults``/``clear_faults``) sends the
rules to the proxy process over its stdin, which answers each command with
the counts of what it forwarded and injected. A fault that no client
retries (403, after the Nth write) stands in for a kill at that write. The
server forgets a completed upload session, which Cloud Storage remembers
(a client whose last upload request lost its reply asks); the proxy answers
for it, as Cloud Storage does.
"""

import argparse
import http.client
import json
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from typing import Dict, Optional

try:
    import gcs_faults  # tests/ on sys.path: the proxy process, the test session.
    import gcs_server
except ImportError:
    from tests import gcs_faults  # Benchmarks, from the repository root.
    from tests import gcs_server

HOSTS = ("www.googleapis.com", "storage.googleapis.com")

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding",
               "expect", "content-length", "upgrade", "te", "trailer"}
_STORAGE_LAYOUT = re.compile(r"^/storage/v1/b/([^/?]+)/storageLayout(\?.*)?$")


def _read_head(stream) -> Optional[tuple]:
    """(request line parts, [(name, value)]) of the next request, or None at EOF."""
    line = stream.readline(65537)
    while line in (b"\r\n", b"\n"):
        line = stream.readline(65537)
    if not line:
        return None
    parts = line.decode("latin-1").split()
    headers = []
    while True:
        header = stream.readline(65537)
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    return parts, headers


def _header(headers, name: str) -> str:
    for key, value in headers:
        if key.lower() == name:
            return value
    return ""


def _read_body(stream, headers) -> bytes:
    if "chunked" in _header(headers, "transfer-encoding").lower():
        chunks = []
        while True:
            size = int(stream.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while stream.readline() not in (b"\r\n", b"\n", b""):
                    pass  # Trailers.
                return b"".join(chunks)
            chunks.append(stream.read(size))
            stream.readline()
    length = int(_header(headers, "content-length") or 0)
    return stream.read(length) if length else b""


def _response_bytes(status: int, reason: str, headers, body: bytes, method: str):
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP_BY_HOP]
    if method == "HEAD":
        length = _header(headers, "content-length")
        if length:
            lines.append(f"Content-Length: {length}")
    elif status >= 200 and status not in (204, 304):
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head, (b"" if method == "HEAD" else body)


def _respond(sock, status: int, reason: str, headers, body: bytes, method: str,
             pause: float = 0.0) -> None:
    head, body = _response_bytes(status, reason, headers, body, method)
    if pause:  # A slow response: half the body, a pause, the rest.
        sock.sendall(head + body[:len(body) // 2])
        time.sleep(pause)
        sock.sendall(body[len(body) // 2:])
        return
    sock.sendall(head + body)


def _storage_layout(bucket: str) -> bytes:
    return json.dumps({"kind": "storage#storageLayout", "bucket": bucket,
                       "location": "US-CENTRAL1", "locationType": "region",
                       "hierarchicalNamespace": {"enabled": False}}).encode()


def _https_locations(headers):
    # The server, speaking plain HTTP, hands out http:// upload session URLs;
    # curl would send those past the (HTTPS-only) proxy to the real host.
    return [(name, re.sub(r"^http://", "https://", value) if name.lower() == "location"
             else value) for name, value in headers]


class _Forwarder:
    """One client connection's keep-alive connection to fake-gcs-server."""

    def __init__(self, port: int):
        self.port = port
        self.connection: Optional[http.client.HTTPConnection] = None

    def send(self, method, target, headers, body):
        for attempt in range(2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
            try:
                self.connection.putrequest(method, target, skip_host=True,
                                           skip_accept_encoding=True)
                for name, value in headers:
                    if name.lower() not in _HOP_BY_HOP:
                        self.connection.putheader(name, value)
                # No Transfer-Encoding, and an explicit length even when empty:
                # the Go server rejects TF's 'Transfer-Encoding: identity'.
                if body or method in ("POST", "PUT", "PATCH"):
                    self.connection.putheader("Content-Length", str(len(body)))
                self.connection.endheaders(body or None)
                response = self.connection.getresponse()
                data = response.read()
                return response.status, response.reason, _https_locations(
                    response.getheaders()), data
            except (http.client.HTTPException, ConnectionError):
                self.connection.close()
                self.connection = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def _serve_tls_connection(tls, upstream_port: int, delay_s: float, log_requests: bool,
                          faults=None) -> None:
    stream = tls.makefile("rb")
    forwarder = _Forwarder(upstream_port)
    while True:
        request = _read_head(stream)
        if request is None:
            return
        started = time.monotonic()
        (method, target, *_), headers = request
        if _header(headers, "expect").lower() == "100-continue":
            tls.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = _read_body(stream, headers)
        if delay_s:
            time.sleep(delay_s)
        kind, fault = (faults.decide(method, _header(headers, "host"), target, headers)
                       if faults else ("", None))
        layout = _STORAGE_LAYOUT.match(target) if method == "GET" else None
        if fault in ("429", "500", "503", "403"):
            status = int(fault)
            status, reason, response_headers, data = (
                status, gcs_faults.REASONS[status], [("Content-Type", "application/json")],
                gcs_faults.error_body(status))
        elif layout:
            status, reason, response_headers, data = (
                200, "OK", [("Content-Type", "application/json")], _storage_layout(layout[1]))
        elif _is_status_query(method, target, headers, body):
            status, reason, response_headers, data = _upload_status(target)
        else:
            status, reason, response_headers, data = _completed_session(
                method, target, forwarder.send(method, target, headers, body))
        if log_requests:
            print(f"{time.time():.3f} {method} {_header(headers, 'host')}{target} "
                  f"{len(body)} B -> {status} {len(data)} B in "
                  f"{1000 * (time.monotonic() - started):.0f} ms [{kind} {fault or ''}]",
                  file=sys.stderr, flush=True)
        if fault == "reset":
            _respond_and_reset(tls, status, reason, response_headers, data, method)
            return
        _respond(tls, status, reason, response_headers, data, method,
                 pause=(faults.slow_s if fault == "slow" else 0.0))
        if _header(headers, "connection").lower() == "close":
            return


_UPLOAD_SESSION = re.compile(r"[?&]upload_id=([^&]+)")
_COMPLETED_UPLOADS: Dict[str, tuple] = {}


def _completed_session(method: str, target: str, response: tuple) -> tuple:
    """The response, or the stored success of an upload session that already completed.

    A client whose final upload request lost its reply (a reset) asks the
    session's status; Cloud Storage answers a completed session with 200
    and the object's metadata, fake-gcs-server with 404 (it forgets the
    session). So the proxy keeps each session's success and answers that.
    """
    session = _UPLOAD_SESSION.search(target) if method == "PUT" else None
    if not session:
        return response
    if response[0] in (200, 201):
        _COMPLETED_UPLOADS[session[1]] = response
    elif response[0] == 404 and session[1] in _COMPLETED_UPLOADS:
        return _COMPLETED_UPLOADS[session[1]]
    return response


def _is_status_query(method: str, target: str, headers, body: bytes) -> bool:
    """A resumable upload's "how much did you get?" (an empty PUT, Content-Range bytes */N)."""
    return (method == "PUT" and not body and bool(_UPLOAD_SESSION.search(target))
            and _header(headers, "content-range").startswith("bytes */"))


def _upload_status(target: str) -> tuple:
    """Cloud Storage's answer to a status query, which fake-gcs-server gets wrong.

    The server finalizes the object with the bytes it has (none, when the
    proxy failed the upload's PUT) and answers 200: an empty object. Cloud
    Storage answers an incomplete session with 308 and the persisted range
    (none here: the proxy forwards an upload's body whole or not at all),
    and the client sends the data again.
    """
    completed = _COMPLETED_UPLOADS.get(_UPLOAD_SESSION.search(target)[1])
    return completed or (308, "Resume Incomplete", [], b"")


def _respond_and_reset(sock, status, reason, headers, body: bytes, method: str) -> None:
    """Sends the head and at most half the body, then resets the connection (RST)."""
    head, _ = _response_bytes(status, reason, headers, body, method)
    sock.sendall(head + body[:len(body) // 2])
    # No TLS close_notify: curl sees the stream cut, as when a connection drops.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _handle_client(sock, context, upstream_port: int, delay_s: float,
                   log_requests: bool, faults=None) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = b""
        while b"\r\n\r\n" not in head:  # curl sends nothing more until we answer.
            chunk = sock.recv(4096)
            if not chunk:
                return
            head += chunk
        target = head.split(b" ", 2)[1].decode("latin-1") if b" " in head else ""
        if not head.startswith(b"CONNECT ") or target.rsplit(":", 1)[0] not in HOSTS:
            # Anything else fails fast and plainly instead of meeting our CA.
            sock.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        with context.wrap_socket(sock, server_side=True) as tls:
            _serve_tls_connection(tls, upstream_port, delay_s, log_requests, faults)
    except (OSError, ssl.SSLError, ValueError):
        pass  # The client went away; curl retries or reports it.
    finally:
        sock.close()


def listen(cert: str, key: str, upstream_port: int, delay_s: float,
            log_requests: bool, faults=None) -> int:
    """Starts the proxy's accept loop in a thread; returns its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)

    def accept_forever():
        while True:
            sock, _ = listener.accept()
            threading.Thread(target=_handle_client, daemon=True,
                             args=(sock, context, upstream_port, delay_s,
                                   log_requests, faults)).start()

    threading.Thread(target=accept_forever, daemon=True).start()
    return listener.getsockname()[1]


def serve(cert: str, key: str, delay_s: float = 0.0, log_requests: bool = False) -> None:
    """Runs fake-gcs-server and the proxy until stdin closes.

    Prints ``{"server_port": ..., "proxy_port": ...}`` as the first line of
    stdout once both accept connections. Then each line on stdin is a
    command (JSON, see :func:`_command`), answered by one line of JSON.
    """
    # SIGTERM would otherwise end us without the finally that stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server_port, server = gcs_server.start_on_a_free_port(HOSTS)
    faults = gcs_faults.Faults()
    try:
        proxy_port = listen(cert, key, server_port, delay_s, log_requests, faults)
        print(json.dumps({"server_port": server_port, "proxy_port": proxy_port}), flush=True)
        for line in sys.stdin:  # Ends at EOF: the parent stopped us or died.
            print(json.dumps(_command(faults, json.loads(line))), flush=True)
    finally:
        server.terminate()
        server.wait()


def _command(faults: "gcs_faults.Faults", command: dict) -> dict:
    """Applies one command of the parent: set or clear fault rules, read the counters."""
    try:
        stats = faults.stats()  # Of the period that this command ends.
        if command["op"] == "faults":
            faults.configure(command["rules"], command.get("seed", 0),
                             command.get("slow_s", 0.5))
            faults.reset_counts()
        elif command["op"] == "reset_counts":
            faults.reset_counts()
        return {"ok": True, **stats}
    except (KeyError, ValueError, TypeError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cert", required=True, help="Server certificate (PEM).")
    parser.add_argument("--key", required=True, help="Its private key (PEM).")
    parser.add_argument("--delay_s", type=float, default=0.0,
                        help="Seconds to wait before forwarding each request.")
    parser.add_argument("--log_requests", action="store_true",
                        help="One line per request on stderr (debugging).")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse_args(sys.argv[1:])
    serve(args.cert, args.key, args.delay_s, args.log_requests)
