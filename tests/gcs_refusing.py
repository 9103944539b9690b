"""A Cloud Storage that refuses every request, as the real one refuses a private bucket.

TensorFlow's gs:// client, when it finds no credentials, sends its requests
without an ``Authorization`` header (it logs "All attempts to get a Google
authentication bearer token failed, returning an empty token"); Cloud
Storage answers 401 for a private bucket. With credentials that lack the
permission it answers 403. fake-gcs-server accepts anonymous requests, so
this stands in for those answers: the TLS proxy of ``gcs_proxy.py`` (the emulator's
throwaway CA, so TF's own curl reaches it through ``HTTPS_PROXY`` exactly as
it reaches the emulator) in front of a server that answers 401 without a
bearer token and 403 with one, with Cloud Storage's JSON error bodies.
"""

import http.server
import json
import threading
from typing import Dict

import gcs_emulator  # tests/gcs_emulator.py
import gcs_proxy  # tests/gcs_proxy.py

_ANONYMOUS = ("Anonymous caller does not have storage.objects.get access to the Google Cloud "
              "Storage object. Permission 'storage.objects.get' denied on resource (or it may "
              "not exist).")
_DENIED = ("caller@example.iam.gserviceaccount.com does not have storage.objects.get access "
           "to the Google Cloud Storage object.")


class _Refuse(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        token = self.headers.get("Authorization", "").removeprefix("Bearer").strip()
        code, message = (403, _DENIED) if token else (401, _ANONYMOUS)
        body = json.dumps({"error": {"code": code, "message": message, "errors": [
            {"message": message, "domain": "global",
             "reason": "forbidden" if token else "required"}]}}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    def log_message(self, *args):
        del args


class RefusingGcs:
    """The refusing server and its TLS proxy, in this process's threads."""

    def __enter__(self) -> "RefusingGcs":
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        certificates = gcs_emulator.certificates()
        self.proxy_port = gcs_proxy.listen(certificates["cert"], certificates["key"],
                                            self._server.server_address[1], 0.0, False)
        return self

    def environ(self) -> Dict[str, str]:
        """TF's gs:// routed here (the bearer token, if any, is the caller's to set)."""
        proxy = f"http://127.0.0.1:{self.proxy_port}"
        return {**gcs_emulator.TENSORFLOW_GCS_DEFAULTS, "HTTPS_PROXY": proxy,
                "https_proxy": proxy, "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost",
                "CURL_CA_BUNDLE": gcs_emulator.certificates()["ca"]}

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
