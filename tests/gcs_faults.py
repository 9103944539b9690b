"""Fault injection for the Cloud Storage emulator's proxy (tests/gcs_emulator.py).

The proxy asks :class:`Faults` what to do with every request it forwards.
A fault is one of what Cloud Storage really does to clients at scale:

* ``"429"``, ``"500"``, ``"503"``: the request is not forwarded; the reply
  is that HTTP status with a JSON error body, as the real service sends;
* ``"403"``: likewise, a refusal no client retries: the request and every
  later one fail at once, as if the process had been killed there;
* ``"reset"``: the request is forwarded (its effect happens), then the reply
  is cut mid-body and the connection reset (TCP RST);
* ``"slow"``: the reply comes whole, but half its body after ``slow_s``.

Which requests: a rule names request *kinds* (:func:`request_kind`: list,
stat, read, write, compose, delete, other), a ``rate`` (the probability
that a request of those kinds gets one of the rule's ``faults``),
optionally ``after`` (the rule starts once that many requests of kind
``after_kind`` have been forwarded: "abort after the Nth write") and
``max_in_a_row``: how many times one request may fail in a row before it
passes (a transient fault a client's retries ride through; ``None`` for an
outage that outlasts any retry), and ``limit``: at most that many faults
from the rule (each costs TensorFlow's client up to a second of back-off,
so a test's time stays bounded).

Deterministic by seed: whether a request is faulted is a hash of the seed,
the rule, the request (method, path and query without the random upload
session id, Range, Content-Range) and how often that same request was seen, so the same
requests meet the same faults in every run whatever the thread
interleaving.
"""

import hashlib
import re
import threading
from typing import Dict, List, Optional

KINDS = ("list", "stat", "read", "write", "compose", "delete", "other")
FAULTS = ("429", "500", "503", "403", "reset", "slow")

_OBJECT = re.compile(r"^/storage/v1/b/[^/]+/o/[^/?]+")
_LIST = re.compile(r"^/storage/v1/b/[^/]+/o/?(\?|$)")
_UPLOAD_ID = re.compile(r"([?&])upload_id=[^&]*")


def request_kind(method: str, host: str, target: str) -> str:
    """The kind of a JSON-API or media request, for fault rules and counts."""
    path = target.split("?", 1)[0]
    if method == "DELETE":
        return "delete"
    if "/compose" in path or "/rewriteTo/" in path or "/copyTo/" in path:
        return "compose"
    if path.startswith("/upload/") or (method in ("POST", "PUT", "PATCH")
                                       and path.startswith("/storage/v1/b/")
                                       and "/o" in path):
        return "write"
    if method in ("GET", "HEAD"):
        if host.startswith("storage.googleapis.com") or path.startswith("/download/"):
            return "read"
        if _OBJECT.match(path):
            return "read" if "alt=media" in target else "stat"
        if _LIST.match(target):
            return "list"
    return "other"


class Faults:
    """The proxy's fault rules and counters; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.configure([], seed=0)
        self.reset_counts()

    def configure(self, rules: List[dict], seed: int = 0, slow_s: float = 0.5) -> None:
        for rule in rules:
            unknown = set(rule.get("kinds", KINDS)) - set(KINDS)
            bad = set(rule["faults"]) - set(FAULTS)
            if unknown or bad:
                raise ValueError(f"Unknown kinds {unknown} or faults {bad} in {rule}.")
        with self._lock:
            defaults = dict(kinds=list(KINDS), rate=1.0, after=0, after_kind="write",
                            max_in_a_row=2, limit=None)
            self._rules = [{**defaults, **rule} for rule in rules]
            self._seed = seed
            self.slow_s = slow_s
            self._seen: Dict[tuple, int] = {}
            self._in_a_row: Dict[tuple, int] = {}

    def reset_counts(self) -> None:
        with self._lock:
            self._forwarded = {kind: 0 for kind in KINDS}
            self._injected = {kind: {fault: 0 for fault in FAULTS} for kind in KINDS}

    def decide(self, method: str, host: str, target: str, headers) -> tuple:
        """(kind, fault or None) for a request; counts it."""
        kind = request_kind(method, host, target)
        request = (method, _UPLOAD_ID.sub(r"\1", target),
                   *(next((v for k, v in headers if k.lower() == name), "")
                     for name in ("range", "content-range")))
        with self._lock:
            occurrence = self._seen.get(request, 0)
            self._seen[request] = occurrence + 1
            fault = self._pick(kind, request, occurrence)
            if fault in (None, "slow", "reset"):
                self._forwarded[kind] += 1  # These reach the server.
            if fault:
                self._injected[kind][fault] += 1
        return kind, fault

    def _pick(self, kind: str, request: tuple, occurrence: int) -> Optional[str]:
        for index, rule in enumerate(self._rules):
            if kind not in rule["kinds"] or self._forwarded[rule["after_kind"]] < rule["after"]:
                continue
            if rule["limit"] is not None and rule.get("_count", 0) >= rule["limit"]:
                continue
            key = (index, request)
            limit = rule["max_in_a_row"]
            if limit is not None and self._in_a_row.get(key, 0) >= limit:
                self._in_a_row[key] = 0
                continue
            draw = self._draw(index, request, occurrence)
            if draw < rule["rate"]:
                self._in_a_row[key] = self._in_a_row.get(key, 0) + 1
                rule["_count"] = rule.get("_count", 0) + 1
                faults = rule["faults"]
                return faults[int(self._draw(index, request, occurrence, "which")
                                  * len(faults)) % len(faults)]
            self._in_a_row[key] = 0
        return None

    def _draw(self, *parts) -> float:
        digest = hashlib.sha256(repr((self._seed, parts)).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def stats(self) -> dict:
        """{'forwarded': {kind: n}, 'injected': {kind: {fault: n}}} since reset_counts."""
        with self._lock:
            return {"forwarded": dict(self._forwarded),
                    "injected": {k: {f: n for f, n in v.items() if n}
                                 for k, v in self._injected.items() if any(v.values())}}


def error_body(status: int) -> bytes:
    """The JSON error body Cloud Storage sends with a failed request."""
    reason = {429: "rateLimitExceeded", 500: "backendError", 503: "backendError",
              403: "forbidden"}[status]
    message = {429: "The rate of change requests to the object is too high.",
               500: "Backend Error", 503: "Service Unavailable (injected by the test)",
               403: "Forbidden (injected by the test)"}[status]
    return ('{"error": {"code": %d, "message": "%s", "errors": [{"reason": "%s", '
            '"message": "%s"}]}}' % (status, message, reason, message)).encode()


REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable",
           403: "Forbidden"}
