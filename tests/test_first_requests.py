"""The first requests after start-up all succeed, however many arrive together (issue 7.2).

Each case runs a fresh interpreter: torch must not be imported yet when the requests arrive,
and this test process imported it long ago.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIRST_REQUESTS = r"""
import json, sys, threading
from speech2image.app import create_app
from speech2image.config import load_settings

app = create_app(load_settings())
fresh = "torch" not in sys.modules
barrier = threading.Barrier(8)
answers = []

def ask(i):
    client = app.test_client()
    barrier.wait()
    r = client.post("/generate-image", json={"prompt": f"a castle number {i}", "seed": i})
    answers.append({"status": r.status_code, "batch_size": (r.json or {}).get("batch_size")})

threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"fresh": fresh, "answers": answers}))
"""


@pytest.mark.parametrize("batch_max_images", [4, 1], ids=["batching-on", "batching-off"])
def test_eight_concurrent_first_requests_all_succeed(
    tmp_path: Path, tiny_models: dict[str, Path], batch_max_images: int
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("S2I_")}
    model = str(tiny_models["tiny-art"])
    env |= {
        "S2I_IMAGE_MODELS": json.dumps({"tiny": {"source": model}}),
        "S2I_STYLE_MODELS": json.dumps({"artistic": "tiny", "photographic": "tiny"}),
        "S2I_IMAGE_ALLOW_DOWNLOAD": "false",
        "S2I_DEFAULT_WIDTH": "64",
        "S2I_DEFAULT_HEIGHT": "64",
        "S2I_DEFAULT_STEPS": "2",
        "S2I_IMAGE_DIR": str(tmp_path / "images"),
        "S2I_DATA_DIR": str(tmp_path / "data"),
        "S2I_LOG_DIR": str(tmp_path / "logs"),
        "S2I_UPLOAD_DIR": str(tmp_path / "uploads"),
        "S2I_RATELIMIT_ENABLED": "false",
        "S2I_MODEL_IDLE_SECONDS": "0",
        "S2I_CLEANUP_INTERVAL_SECONDS": "0",
        "S2I_BATCH_MAX_IMAGES": str(batch_max_images),
        "S2I_BATCH_MAX_WAIT_MS": "200",
    }
    run = subprocess.run(
        [sys.executable, "-c", FIRST_REQUESTS],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["fresh"], "torch was imported before the first request"
    statuses = [a["status"] for a in result["answers"]]
    assert statuses == [200] * 8, run.stderr[-3000:]
    if batch_max_images > 1:
        assert max(a["batch_size"] for a in result["answers"]) > 1  # requests were merged
    else:
        assert {a["batch_size"] for a in result["answers"]} == {1}
