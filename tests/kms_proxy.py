"""A small fault-injecting HTTP proxy in front of the moto server, for subprocess tests.

moto has no throttling and serves disabled or pending-deletion keys as if enabled, so the
proxy answers some requests itself with KMS's real error responses (JSON protocol:
``{"__type": code, "message": ...}``, with the HTTP status the KMS API reference gives
for that error) and forwards the rest to moto untouched.
"""

from __future__ import annotations

import json
import random
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.helpers import KMS_ERRORS


@dataclass
class Rule:
    """Answer `code` to calls of `target` (e.g. 'Encrypt'; '*' for all) with probability p,
    once `after` matching calls have passed through."""

    code: str
    target: str = "*"
    p: float = 1.0
    after: int = 0
    seen: int = 0


@dataclass
class ProxyState:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    injected: Counter[str] = field(default_factory=Counter)
    forwarded: Counter[str] = field(default_factory=Counter)
    rng: random.Random = field(default_factory=lambda: random.Random(1234))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def decide(self, target: str) -> str | None:
        with self.lock:
            for rule in self.rules:
                if rule.target not in ("*", target):
                    continue
                rule.seen += 1
                if rule.seen > rule.after and self.rng.random() < rule.p:
                    self.injected[f"{target}:{rule.code}"] += 1
                    return rule.code
            self.forwarded[target] += 1
        return None


def _handler(state: ProxyState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            target = (self.headers.get("X-Amz-Target") or "").rsplit(".", 1)[-1]
            code = state.decide(target)
            if code is not None:
                status, message = KMS_ERRORS[code]
                payload = json.dumps({"__type": code, "message": message}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("x-amzn-RequestId", "00000000-0000-0000-0000-000000000000")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in {"host", "content-length", "connection"}}
            req = urllib.request.Request(state.upstream + self.path, data=body,
                                         headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    status, out, rh = resp.status, resp.read(), resp.headers
            except urllib.error.HTTPError as err:
                status, out, rh = err.code, err.read(), err.headers
            self.send_response(status)
            for k, v in rh.items():
                if k.lower() not in {"content-length", "connection", "transfer-encoding",
                                     "server", "date"}:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    return Handler


@contextmanager
def kms_proxy(upstream: str) -> Iterator[tuple[str, ProxyState]]:
    """Run the proxy on a free loopback port; yields its URL and its mutable state."""
    state = ProxyState(upstream)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
