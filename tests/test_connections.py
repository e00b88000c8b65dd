"""Clients' connections: a half-closed socket still gets its answer (issue 18.8)."""

from __future__ import annotations

import http.client
import json
import socket

from .test_images import image_files

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
