"""The HTTP client half of the CLI: prompt sets and jobs (ALIGND_API_URL, ALIGND_API_KEY)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import httpx

from app.core.config import get_settings

TERMINAL = {"succeeded", "failed", "cancelled"}
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


class ApiError(Exception):
    pass


class Client:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> None:
        settings = get_settings()
        key = api_key or settings.api_key
        if not key:
            raise ApiError("no API key: set ALIGND_API_KEY (create one with `alignd keys create --tenant NAME`)")
        self.http = httpx.Client(base_url=(base_url or settings.api_url).rstrip("/"), timeout=timeout,
                                 headers={"Authorization": f"Bearer {key}"})

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the API at {self.http.base_url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                detail = f"{error['message']} ({error.get('code')})"
            except (ValueError, KeyError, TypeError):
                detail = response.text[:500]
            raise ApiError(f"{response.status_code}: {detail}")
        return response.json()

    def stream_events(self, job_id: str) -> Any:
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", params={"stream": "true"},
                              timeout=httpx.Timeout(60.0, read=None)) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(f"{response.status_code}: {response.text[:500]}")
            kind = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    yield kind, json.loads(line[6:])


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2))


def register(sub: argparse._SubParsersAction) -> None:
    ps = sub.add_parser("prompt-sets", help="upload and list prompt sets")
    ps_sub = ps.add_subparsers(dest="ps_command", required=True)
    upload = ps_sub.add_parser("upload", help="upload a JSONL, CSV or Parquet file")
    upload.add_argument("file", type=Path)
    upload.add_argument("--name")
    upload.add_argument("--idempotency-key")
    upload.set_defaults(handler=prompt_sets_upload)
    ps_list = ps_sub.add_parser("list")
    ps_list.set_defaults(handler=lambda a: _print(Client().request("GET", "/v1/prompt-sets")))

    jobs = sub.add_parser("jobs", help="create and follow alignment jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    create = jobs_sub.add_parser("create", help="create a job")
    create.add_argument("--recipe", help=f"start from a recipe: one of {', '.join(recipe_names())} "
                        "(recipes/NAME.yaml), or a YAML file")
    create.add_argument("--body", type=Path, help="a JSON file with the job body (over the recipe)")
    create.add_argument("--base-model")
    create.add_argument("--prompt-set")
    create.add_argument("--reward-model", help="reward model name")
    create.add_argument("--reward-type", choices=["pairrm", "scalar", "implicit", "rules", "judge"])
    create.add_argument("--algorithm", choices=["dpo", "ipo", "sppo", "sppo_hard", "rejection_sampling"])
    create.add_argument("--rounds", type=int)
    create.add_argument("--samples-per-prompt", type=int)
    create.add_argument("--suffix")
    create.add_argument("--idempotency-key")
    create.set_defaults(handler=jobs_create)
    for name, handler in (("get", jobs_get), ("cancel", jobs_cancel), ("watch", jobs_watch),
                          ("rounds", jobs_rounds)):
        p = jobs_sub.add_parser(name)
        p.add_argument("job_id")
        p.set_defaults(handler=handler)
    jobs_list = jobs_sub.add_parser("list")
    jobs_list.add_argument("--limit", type=int, default=20)
    jobs_list.add_argument("--status")
    jobs_list.set_defaults(handler=jobs_list_cmd)


def prompt_sets_upload(args: argparse.Namespace) -> int:
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    with args.file.open("rb") as fh:
        data = {"name": args.name} if args.name else {}
        _print(Client().request("POST", "/v1/prompt-sets", files={"file": (args.file.name, fh)}, data=data,
                                headers=headers))
    return 0


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name: str) -> dict[str, Any]:
    """A recipe's job body: `recipes/<name>.yaml`, or a YAML file given by path."""
    import yaml

    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        if name not in recipe_names():
            raise ApiError(f"no recipe {name!r}; recipes: {', '.join(recipe_names())}")
        path = RECIPES_DIR / f"{name}.yaml"
    body = yaml.safe_load(path.read_text())
    if not isinstance(body, dict):
        raise ApiError(f"recipe {name!r} is not a mapping of job fields")
    return body


def merge_body(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, nested objects merged key by key (a recipe's reward model keeps its
    model when a flag changes only its type, for instance)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_body(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_job_body(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe, then the --body file, then the flags, each over the one before."""
    body: dict[str, Any] = load_recipe(args.recipe) if getattr(args, "recipe", None) else {}
    if args.body:
        body = merge_body(body, json.loads(args.body.read_text()))
    for field, value in (("base_model", args.base_model), ("prompt_set", args.prompt_set),
                         ("rounds", args.rounds), ("samples_per_prompt", args.samples_per_prompt),
                         ("suffix", args.suffix)):
        if value is not None:
            body[field] = value
    if args.reward_model or args.reward_type:
        reward = dict(body.get("reward_model") or {})
        if args.reward_model:
            reward["model"] = args.reward_model
        if args.reward_type:
            reward["type"] = args.reward_type
        body["reward_model"] = reward
    if getattr(args, "algorithm", None):
        body["algorithm"] = {**(body.get("algorithm") or {}), "type": args.algorithm}
    return body


def jobs_create(args: argparse.Namespace) -> int:
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    _print(Client().request("POST", "/v1/jobs", json=build_job_body(args), headers=headers))
    return 0


def jobs_get(args: argparse.Namespace) -> int:
    _print(Client().request("GET", f"/v1/jobs/{args.job_id}"))
    return 0


def jobs_cancel(args: argparse.Namespace) -> int:
    _print(Client().request("POST", f"/v1/jobs/{args.job_id}/cancel"))
    return 0


def jobs_list_cmd(args: argparse.Namespace) -> int:
    params = {"limit": args.limit, **({"status": args.status} if args.status else {})}
    for job in Client().request("GET", "/v1/jobs", params=params)["data"]:
        print(f"{job['id']}  {job['status']:<10}  round {job['current_round']}/{job['rounds']}  {job['base_model']}")
    return 0


def format_rounds_table(rounds: list[dict[str, Any]]) -> str:
    columns = [("eval_mean_reward", "mean reward"), ("eval_base_mean_reward", "base reward"),
               ("eval_win_rate", "win rate"), ("eval_lc_win_rate", "LC win rate"), ("eval_mean_length", "mean length"),
               ("pairs_kept", "pairs")]
    header = f"{'round':>5}  {'status':<10}" + "".join(f"  {title:>12}" for _, title in columns)
    lines = [header, "-" * len(header)]
    for row in rounds:
        metrics = row.get("metrics") or {}
        cells = []
        for key, _ in columns:
            value = metrics.get(key)
            cells.append(f"  {value:>12.3f}" if isinstance(value, float) else f"  {str(value or '-'):>12}")
        lines.append(f"{row['round']:>5}  {row['status']:<10}" + "".join(cells))
    return "\n".join(lines)


def jobs_rounds(args: argparse.Namespace) -> int:
    print(format_rounds_table(Client().request("GET", f"/v1/jobs/{args.job_id}/rounds")["data"]))
    return 0


def jobs_watch(args: argparse.Namespace) -> int:
    client = Client()
    status = None
    for kind, data in client.stream_events(args.job_id):
        if kind == "end":
            status = data.get("status")
            break
        print(f"{data['created_at']}  {data['level']:<7}  {data['type']:<22}  {data['message']}", flush=True)
    print(format_rounds_table(client.request("GET", f"/v1/jobs/{args.job_id}/rounds")["data"]))
    job = client.request("GET", f"/v1/jobs/{args.job_id}")
    print(f"job {job['id']}: {job['status']}" + (f"  model: {job['fine_tuned_model']}" if job.get(
        "fine_tuned_model") else "") + (f"  error: {job['error']['message']}" if job.get("error") else ""))
    return 0 if (status or job["status"]) == "succeeded" else 1


