"""A recipe job through the real stack: `alignd jobs create --recipe sppo` (SPPO with PairRM) on the
tiny models, with early stopping and best-round selection deciding where the job ends and which
round it serves."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.e2e.stack import ROOT
from tests.e2e.test_jobs_end_to_end import FAST, prompts

pytestmark = pytest.mark.slow


def test_sppo_recipe_job_stops_early_and_serves_its_best_round(stack, client, tmp_path):
    prompt_set = client.upload(prompts(40, seed=11))
    overrides = {**{k: v for k, v in FAST.items() if k != "algorithm"}, "algorithm": {"eta": 10},
                 "rounds": 3, "early_stopping": {"patience": 1, "min_delta": 100.0}}
    body_file = tmp_path / "fast.json"
    body_file.write_text(json.dumps(overrides))
    env = {**stack.env, "ALIGND_API_URL": stack.url, "ALIGND_API_KEY": client.key}
    created = subprocess.run(
        [sys.executable, "-m", "alignd.cli", "jobs", "create", "--recipe", "sppo", "--body", str(body_file),
         "--base-model", "tiny-mistral", "--prompt-set", prompt_set["id"], "--reward-model", "tiny-pairrm"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    job = json.loads(created.stdout)
    assert job["algorithm"]["type"] == "sppo" and job["algorithm"]["beta"] == pytest.approx(0.1)

    job = client.wait(job["id"], timeout=600)
    assert job["status"] == "succeeded", job
    assert job["current_round"] == 2 and job["fine_tuned_model"]  # round 2 cannot beat round 1 by 100
    rounds = client.rounds(job["id"])
    assert [r["round"] for r in rounds] == [1, 2]
    selected = [r["round"] for r in rounds if r["metrics"]["selected"]]
    best = max(rounds, key=lambda r: (r["metrics"]["eval_win_rate"], r["metrics"]["eval_mean_reward"], r["round"]))
    assert selected == [best["round"]]
    for r in rounds:
        for key in ("eval_win_rate", "eval_lc_win_rate", "eval_mean_length", "eval_base_mean_length"):
            assert key in r["metrics"]
    events = client.events(job["id"])
    stopped = [e for e in events if e["type"] == "job.early_stopped"]
    assert stopped and "early stopping after round 2 of 3" in stopped[0]["message"]
    assert [e["data"]["round"] for e in events if e["type"] == "job.round_selected"] == selected
    assert events[-1]["type"] == "job.succeeded"

    artifacts = ROOT / stack.env["ALIGND_ARTIFACT_ROOT"] / job["id"]
    first, second = (load_file(str(artifacts / f"round-{n}" / "model" / "adapter_model.safetensors"))
                     for n in (1, 2))
    assert any(not first[k].equal(second[k]) for k in first)  # round 2 trained the adapter further
