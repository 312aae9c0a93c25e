"""`alignd up` with no database or broker settings: SQLite and the filesystem Celery broker, the
same code path as production, from job submission to querying the aligned model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from alignd.processes import stop_process_group
from tests.e2e.stack import ROOT, free_port
from tests.e2e.test_jobs_end_to_end import FAST, prompts

pytestmark = pytest.mark.slow


def test_alignd_up_runs_a_job_on_the_embedded_default(tiny_models, tmp_path):
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")},
           "ALIGND_HOME": str(tmp_path / "home"), "ALIGND_MODEL_ROOT": str(tiny_models.root),
           "ALIGND_MODEL_SERVER_URL": f"http://127.0.0.1:{free_port()}", "TOKENIZERS_PARALLELISM": "false"}
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen([sys.executable, "-m", "alignd.cli", "up", "--port", str(port)], env=env, cwd=ROOT,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.5)
        assert httpx.get(f"{url}/readyz").json()["checks"] == {"database": True, "broker": True}
        key = subprocess.run([sys.executable, "-m", "alignd.cli", "keys", "create", "--tenant", "laptop"], env=env,
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        data = "\n".join(json.dumps({"prompt": p}) for p in prompts(40, seed=9)).encode()
        prompt_set = api.post("/v1/prompt-sets", files={"file": ("p.jsonl", data)}).json()
        job = api.post("/v1/jobs", json={"base_model": "tiny-mistral", "prompt_set": prompt_set["id"], "rounds": 1,
                                         "reward_model": {"type": "scalar", "model": "tiny-rm"}, **FAST}).json()
        deadline = time.monotonic() + 300
        while (job := api.get(f"/v1/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(1)
        assert job["status"] == "succeeded", job
        assert (tmp_path / "home" / "alignd.db").is_file() and (tmp_path / "home" / "broker").is_dir()
        answer = api.post(f"/v1/models/{job['fine_tuned_model']}/generate",
                          json={"inputs": "[INST] tell me about the cat [/INST]", "parameters": {"max_new_tokens": 8}})
        assert answer.status_code == 200, answer.text
        assert isinstance(answer.json()[0]["generated_text"], str)
    finally:
        stop_process_group(up, timeout=60)
