"""Clients' connections: half-closed sockets get their answer; event streams per key (issue 18)."""

from __future__ import annotations

import http.client
import json
import socket

from .test_images import image_files
from .test_jobs import submit

REQUEST = json.dumps({"prompt": "a castle", "steps": 12, "seed": 1}).encode()


def _address(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").split(":")
    return host, int(port)


def test_a_client_that_half_closes_after_its_request_gets_the_answer(make_app, live_server):
    # Issue 18.8: shutdown(SHUT_WR) after the request read as a closed connection, and the job
    # was cancelled (499). The server now asks with an interim 100 Continue: a closed socket
    # answers it with a reset (cancelled, tests/test_jobs.py), a half-closed one reads it.
    app = make_app(job_workers=1)
    host, port = _address(live_server(app))
    with socket.create_connection((host, port), timeout=120) as sock:
        sock.sendall(
            b"POST /generate-image HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(REQUEST)}\r\n\r\n".encode()
            + REQUEST
        )
        sock.shutdown(socket.SHUT_WR)  # "that is all I send"
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    interim, _, final = received.partition(b"\r\n\r\n")
    assert interim == b"HTTP/1.1 100 Continue", received[:200]
    assert final.startswith(b"HTTP/1.1 200"), final[:200]
    answer = json.loads(final.partition(b"\r\n\r\n")[2])
    assert image_files(app) == [answer["images"][0]["filename"]]
    (job,) = app.extensions["jobs"]._jobs.values()
    assert job.state == "succeeded"

    # An HTTP library skips the interim answer: http.client, under requests and urllib3.
    connection = http.client.HTTPConnection(host, port, timeout=120)
    try:
        connection.request("POST", "/generate-image", REQUEST, {"Content-Type": "application/json"})
        connection.sock.shutdown(socket.SHUT_WR)
        response = connection.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["images"][0]["seed"] == 1
    finally:
        connection.close()


def test_event_streams_are_limited_per_key_and_not_shared(make_app) -> None:
    # Issue 18.6: one key holding the four stream slots made every other key's
    # /jobs/<id>/events answer 503. Each key now has its own share of a larger pool.
    keys = ["k-alice", "k-bob", "k-carol"]
    app = make_app(api_keys=keys, event_streams=5, event_streams_per_key=2)
    client = app.test_client()
    auth = {key: {"Authorization": f"Bearer {key}"} for key in keys}
    jobs = {key: submit(client, headers=auth[key], prompt="a castle", steps=2).json for key in keys}
    opened = []

    def stream(key: str):  # type: ignore[no-untyped-def]
        response = client.get(f"/jobs/{jobs[key]['id']}/events", headers=auth[key], buffered=False)
        if response.status_code == 200:
            opened.append(response)
        return response

    assert [stream("k-alice").status_code for _ in range(2)] == [200, 200]
    refused = stream("k-alice")  # alice's share is taken: her problem, not everyone's
    assert refused.status_code == 429, refused.json
    assert refused.json["error"]["code"] == "too_many_streams"
    assert int(refused.headers["Retry-After"]) > 0
    assert "poll GET /jobs" in refused.json["error"]["message"]
    # Her polling fallback still works, and the others still get streams.
    assert client.get(f"/jobs/{jobs['k-alice']['id']}", headers=auth["k-alice"]).status_code == 200
    assert [stream("k-bob").status_code for _ in range(2)] == [200, 200]
    assert stream("k-carol").status_code == 200
    full = stream("k-carol")  # all five slots are open now
    assert full.status_code == 503 and full.json["error"]["code"] == "service_busy"
    opened.pop().close()  # a stream that closes gives its slot back (the test client's
    assert stream("k-carol").status_code == 200  # streams close last opened, first closed)
    while opened:
        opened.pop().close()
    assert stream("k-alice").status_code == 200
    opened.pop().close()
