"""decrypt_secret calls/s: the process's cached boto3 client vs the guide's client per call.

KMS is simulated by a botocore ``before-send`` handler that sleeps a fixed latency
(``--latency-ms``, default 2 ms) and returns a well-formed KMS JSON response, so that
everything the application pays for on its side stays in the measurement: building the
request, signing it (SigV4), parsing the response, and for the guide's helper building a
new client (and session lookups) on every call. Nothing goes on the network; real KMS
would add a new TCP + TLS handshake per call to the guide's figure, so its real gap is
wider than measured here.

    .venv/bin/python benchmarks/bench_runtime.py [--latency-ms 2] [--calls 400]
                                                 [--threads 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Fake credentials, no profile, and an endpoint nobody listens on: if the simulated KMS
# were ever bypassed, calls would fail fast instead of reaching AWS.
for _var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
    os.environ.pop(_var, None)
os.environ.update({
    "AWS_ACCESS_KEY_ID": "AKIABENCHMARK0000000",
    "AWS_SECRET_ACCESS_KEY": "bench-secret-not-real",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_ENDPOINT_URL_KMS": "http://127.0.0.1:9",
    "AWS_KMS_KEY_ID": "alias/coinflip-master-key",
    "USE_AWS_KMS": "true",
})

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import boto3  # noqa: E402
import botocore  # noqa: E402
from botocore.awsrequest import AWSPreparedRequest, AWSResponse  # noqa: E402

from benchmarks.fake_kms import RawBody  # noqa: E402
from migration import runtime  # noqa: E402
from migration.codec import encode_kms  # noqa: E402
from tests import guide_kms_encryption as guide  # noqa: E402

KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
PLAINTEXT = "5KQwrPbwdL6PhXujxW37FSSQZ1JiwsST4cqQzDeyXtP79zkvFD3xYjRmNq8sV2bLcE6hTgWu4pZ"
# Shaped like a real KMS blob (version byte 0x01, ~170 bytes), so never Fernet-shaped.
STORED = encode_kms(b"\x01\x02\x03\x00x" + os.urandom(165))


class SimulatedKMS:
    """A before-send handler: wait the latency, answer what KMS would answer."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.requests = 0
        self._lock = threading.Lock()

    def __call__(self, request: AWSPreparedRequest, **_: Any) -> AWSResponse:
        with self._lock:
            self.requests += 1
        target = request.headers.get("X-Amz-Target", "")
        if isinstance(target, bytes):
            target = target.decode()
        sent = json.loads(request.body or b"{}")
        if "Authorization" not in request.headers:
            raise AssertionError("request was not signed")
        time.sleep(self.latency)
        if target.endswith(".Decrypt"):
            assert base64.b64decode(sent["CiphertextBlob"]) == base64.b64decode(STORED)
            doc = {"KeyId": KEY_ARN, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                   "Plaintext": base64.b64encode(PLAINTEXT.encode()).decode()}
        elif target.endswith(".Encrypt"):
            doc = {"KeyId": KEY_ARN, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                   "CiphertextBlob": STORED}
        else:
            raise AssertionError(f"unexpected KMS call {target}")
        body = json.dumps(doc).encode()
        headers = {"x-amzn-RequestId": str(uuid.uuid4()),
                   "Content-Type": "application/x-amz-json-1.1",
                   "Content-Length": str(len(body))}
        return AWSResponse(request.url, 200, headers, RawBody(body))


def run(fn: Callable[[str], str], calls: int, threads: int) -> float:
    """Calls per second of fn over `calls` calls spread on `threads` threads."""
    def one(_: int) -> None:
        if fn(STORED) != PLAINTEXT:
            raise AssertionError("wrong plaintext")

    started = time.perf_counter()
    if threads == 1:
        for i in range(calls):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(calls)))
    return calls / (time.perf_counter() - started)


def _nproc() -> int:
    """CPUs this process may run on (what `nproc` prints)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency-ms", type=float, default=2.0, help="simulated KMS latency")
    ap.add_argument("--calls", type=int, default=400, help="decrypt_secret calls per round")
    ap.add_argument("--threads", type=int, default=1, help="application threads calling")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported")
    args = ap.parse_args()
    kms = SimulatedKMS(args.latency_ms / 1000)

    # The helper's one client: hook it once.
    runtime.reset_cache()
    runtime.kms_client().meta.events.register("before-send.kms", kms)
    # The guide's helper makes `boto3.client(...)` (the default session) on every call;
    # clients copy their session's handlers when made, so hook the session once.
    boto3.setup_default_session()
    assert boto3.DEFAULT_SESSION is not None
    boto3.DEFAULT_SESSION.events.register("before-send.kms", kms)

    made = {"n": 0}
    real_client = boto3.session.Session.client

    def counting(self: boto3.session.Session, *a: Any, **kw: Any) -> Any:
        made["n"] += 1
        return real_client(self, *a, **kw)

    boto3.session.Session.client = counting

    contenders: dict[str, Callable[[str], str]] = {
        "cached client (migration.decrypt_secret)": runtime.decrypt_secret,
        "client per call (guide's decrypt_secret)": guide.decrypt_secret,
    }
    results: dict[str, float] = {}
    for name, fn in contenders.items():
        run(fn, 20, 1)  # warm-up: service model loading, first connection set-up
        made["n"], before = 0, kms.requests
        rounds = [run(fn, args.calls, args.threads) for _ in range(args.repeat)]
        results[name] = statistics.median(rounds)
        per_call = made["n"] / (args.calls * args.repeat)
        assert kms.requests - before == args.calls * args.repeat, "a call bypassed the hook"
        print(f"{name:44s} {results[name]:8.1f} calls/s  (rounds: "
              f"{', '.join(f'{r:.1f}' for r in rounds)}; new clients per call: {per_call:.2f})")

    cached, per_call_fig = results.values()
    ideal = args.threads / (args.latency_ms / 1000)
    print(f"{'ideal (latency only, no client work)':44s} {ideal:8.1f} calls/s")
    print(f"ratio cached / client-per-call: {cached / per_call_fig:.1f}x")
    for name, r in results.items():
        overhead = args.threads / r * 1000 - args.latency_ms
        print(f"  time per call beyond the latency (per thread), {name.split(' (')[0]}: "
              f"{overhead:.2f} ms")
    print(f"latency {args.latency_ms} ms, {args.calls} calls x {args.repeat} rounds, "
          f"{args.threads} thread(s); Python {platform.python_version()}, boto3 "
          f"{boto3.__version__}, botocore {botocore.__version__}, nproc {_nproc()}, "
          f"{platform.machine()} {platform.system()}")


if __name__ == "__main__":
    main()
