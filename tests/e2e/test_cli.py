"""The CLI client against the running API: upload, create, list, get, watch, cancel."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.stack import ROOT

pytestmark = pytest.mark.slow


def alignd(stack, key: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**stack.env, "ALIGND_API_URL": stack.url, "ALIGND_API_KEY": key}
    return subprocess.run([sys.executable, "-m", "alignd.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=check)


def test_cli_client_round_trip(stack, tmp_path):
    key = stack.key("cli-tenant")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"tell me about the river {i}"}) for i in range(10)))
    uploaded = json.loads(alignd(stack, key, "prompt-sets", "upload", str(prompts), "--name", "cli").stdout)
    assert uploaded["num_prompts"] == 10 and uploaded["name"] == "cli"

    # A job whose base model does not exist fails in validation, quickly.
    created = json.loads(alignd(stack, key, "jobs", "create", "--base-model", "no-such-model", "--prompt-set",
                                uploaded["id"], "--reward-type", "scalar", "--reward-model", "tiny-rm",
                                "--rounds", "1").stdout)
    assert created["status"] == "validating" and created["rounds"] == 1
    watched = alignd(stack, key, "jobs", "watch", created["id"], check=False)
    assert watched.returncode == 1
    assert "job.failed" in watched.stdout and "model_not_found" not in watched.stderr
    assert f"job {created['id']}: failed" in watched.stdout
    listed = alignd(stack, key, "jobs", "list").stdout
    assert created["id"] in listed and "failed" in listed
    assert json.loads(alignd(stack, key, "jobs", "get", created["id"]).stdout)["error"]["code"] == "model_not_found"

    queued = json.loads(alignd(stack, key, "jobs", "create", "--base-model", "no-such-model", "--prompt-set",
                               uploaded["id"], "--rounds", "1").stdout)
    cancel = alignd(stack, key, "jobs", "cancel", queued["id"], check=False)
    # Either cancelled while validating, or validation failed it first: never an error from the CLI
    # unless the job had already ended.
    assert cancel.returncode == 0 or "job_not_cancellable" in cancel.stderr


def test_cli_reports_api_errors_clearly(stack):
    result = alignd(stack, "ak_wrong", "jobs", "list", check=False)
    assert result.returncode == 1 and "401" in result.stderr and "invalid API key" in result.stderr
    missing = alignd(stack, stack.key("cli-tenant-2"), "jobs", "get", "job_missing", check=False)
    assert missing.returncode == 1 and "404" in missing.stderr
