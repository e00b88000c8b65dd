"""Jobs caught by an outage of the history database end with the right error, rows included."""

from __future__ import annotations

import time

from .distributed_cluster import TcpProxy
from .test_jobs import submit, wait_state


def test_a_job_caught_by_a_database_outage_fails_database_unavailable(
    make_app, postgres_url: str
) -> None:
    from speech2image.storage import JobStore, make_engine

    proxy = TcpProxy(("127.0.0.1", 5432))
    proxy.start()
    try:
        through = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        app = make_app(
            database_url=through,
            storage_retry_seconds=1,
            database_connect_timeout_seconds=1,
            database_statement_timeout_seconds=2,
        )
        client = app.test_client()
        job = submit(client, prompt="a lighthouse", steps=40).json
        wait_state(client, job["id"], {"running"})
        proxy.stop()  # the database goes away while the job runs
        listing = client.get("/jobs")
        assert listing.status_code == 503, listing.json
        assert listing.json["error"]["code"] == "database_unavailable"
        assert int(listing.headers["Retry-After"]) >= 1
        done = wait_state(client, job["id"], {"succeeded", "failed"}, timeout=120)
        assert done["state"] == "failed", done
        assert done["error"]["code"] == "database_unavailable" and done["error"]["status"] == 503
        proxy.start()
        store = JobStore(make_engine(postgres_url))
        deadline = time.monotonic() + 60
        while (row := store.get(job["id"])).state != "failed":  # its end, written when back
            assert time.monotonic() < deadline, row.state
            time.sleep(0.2)
        assert row.error["code"] == "database_unavailable"
        store.engine.dispose()
        assert client.get(f"/jobs/{job['id']}").json["error"]["code"] == "database_unavailable"
    finally:
        proxy.stop()
