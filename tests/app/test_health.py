from __future__ import annotations

import subprocess
import sys


def test_healthz(api):
    assert api.http.get("/healthz").json() == {"status": "ok"}


def test_readyz_checks_database_and_broker(api):
    response = api.http.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["checks"] == {"database": True, "broker": True}


def test_readyz_answers_503_when_the_broker_is_down(backend, monkeypatch):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import reset_caches

    monkeypatch.setenv("ALIGND_BROKER_URL", "redis://127.0.0.1:1/0")
    reset_caches()
    with TestClient(create_app()) as http:
        response = http.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"] == {"database": True, "broker": False}


def test_metrics_exposes_requests_and_jobs(api):
    api.http.get("/v1/jobs", headers=api.headers())
    text = api.http.get("/metrics").text
    assert 'alignd_http_requests_total{method="GET",route="/v1/jobs",status="200"}' in text
    assert "alignd_http_request_duration_seconds_bucket" in text
    assert "# TYPE alignd_jobs gauge" in text


def test_api_process_does_not_import_ml_libraries():
    code = ("import sys; from app.main import create_app; create_app(); "
            "import app.api.routes.jobs, app.services.jobs, app.queue; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'trl', 'vllm', 'workers')];"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
