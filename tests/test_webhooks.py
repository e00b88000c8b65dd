"""Webhooks (issue 17): the job document POSTed when a job ends, signed, retried from a row."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

ONE_STEP = {"prompt": "a harbour at dusk", "steps": 1, "width": 64, "height": 64, "async": True}


class Receiver:
    """A loopback HTTP server that answers 500 to the first delivery, then 200."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.failures_left = 1
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                failing = receiver.failures_left > 0
                receiver.failures_left -= 1
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def wait_for(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.received) >= count, self.received


@pytest.fixture
def receiver():  # type: ignore[no-untyped-def]
    server = Receiver()
    yield server
    server.server.shutdown()
    server.server.server_close()


def _job_when(client, job_id: str, done) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json
        if done(job):
            return job
        time.sleep(0.05)
    raise AssertionError(job)


def test_a_job_end_is_delivered_signed_and_retried(make_app, receiver) -> None:
    app = make_app(
        webhook_allow_private=True,  # the receiver is on loopback
        webhook_secret="shared-secret",
        webhook_retry_seconds=0.1,
        webhook_poll_seconds=0.05,
    )
    client = app.test_client()
    accepted = client.post("/generate-image", json=ONE_STEP, headers={"Callback-URL": receiver.url})
    assert accepted.status_code == 202, accepted.json
    receiver.wait_for(2)  # the first attempt got a 500: retried with back-off
    headers, body = receiver.received[-1]
    document = json.loads(body)
    assert document["id"] == accepted.json["id"] and document["state"] == "succeeded"
    assert len(document["result"]["images"]) == 1
    stamp, signature = (part.split("=", 1)[1] for part in headers["X-S2I-Signature"].split(","))
    expected = hmac.new(b"shared-secret", stamp.encode() + b"." + body, hashlib.sha256)
    assert hmac.compare_digest(signature, expected.hexdigest())
    assert headers["X-S2I-Event"] == "job.succeeded"

    job = _job_when(client, accepted.json["id"], lambda j: j["webhooks"][0]["state"] != "pending")
    (delivery,) = job["webhooks"]
    assert delivery["state"] == "delivered" and delivery["attempts"] == 2
    assert delivery["last_status"] == 200


def test_callback_urls_the_service_will_not_call_are_refused(make_app) -> None:
    client = make_app(webhook_secret="s").test_client()
    for url in ("ftp://example.com/x", "http://127.0.0.1:9/hook", "http://169.254.169.254/"):
        refused = client.post("/generate-image", json=ONE_STEP, headers={"Callback-URL": url})
        assert refused.status_code == 400, url
        assert refused.json["error"]["details"]["field"] == "Callback-URL"
    assert client.get("/jobs").json["total"] == 0  # nothing was accepted
    unsigned = make_app(webhook_allow_private=True).test_client()
    refused = unsigned.post(
        "/generate-image", json=ONE_STEP, headers={"Callback-URL": "http://127.0.0.1:9/h"}
    )
    assert refused.status_code == 400 and "secret" in refused.json["error"]["message"]
