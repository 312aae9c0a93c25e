"""HTTP clients for the servers that run the models: vLLM's OpenAI server and alignd's embedded
model server (`alignd model-server`). The API only ever talks to them over HTTP.

Both speak OpenAI's `/v1/chat/completions` and `/v1/completions` (SSE streams passed through
byte for byte). They differ in two places:

- Hugging Face `generate`: the embedded server has the route itself; for vLLM the text is
  tokenized by vLLM's `/tokenize` without special tokens, given exactly one BOS here, and sent to
  `/v1/completions` as token ids, so no chat template and no second BOS is ever applied.
- LoRA adapters: vLLM learns a job's adapter at run time (`POST /v1/load_lora_adapter`, with
  `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`). It is loaded lazily: a request vLLM answers 404 (the
  adapter is not there: first use, or vLLM restarted and forgot its runtime adapters) loads it
  and is sent once more. The embedded server loads models itself from the artifact store.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

import httpx

from app.core.config import Settings, get_settings
from app.core.errors import AlignError
from app.schemas.inference import GenerateParameters
from app.services.served_models import BackendRoute, ServedModelInfo, route_for


class UpstreamError(AlignError):
    """The model backend refused the request or could not be reached (status set per instance)."""

    def __init__(self, status_code: int, message: str, *, type_: str = "server_error",
                 code: str = "backend_error", param: str | None = None) -> None:
        super().__init__(message, param=param, code=code)
        self.status_code = status_code
        self.type = type_


def _unreachable(url: str, exc: httpx.HTTPError) -> UpstreamError:
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return UpstreamError(504, f"the model backend at {url} timed out", code="backend_timeout")
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return UpstreamError(503, f"the model backend at {url} is unreachable", type_="service_unavailable_error",
                             code="backend_unavailable")
    return UpstreamError(502, f"the model backend at {url} failed: {type(exc).__name__}", code="bad_gateway")


def _refusal(response: httpx.Response, body: bytes) -> UpstreamError:
    """The backend's own error, in alignd's envelope. vLLM and the embedded server both answer
    `{"error": {"message", "type", "code"}}` (older vLLM: the same keys at the top level)."""
    try:
        data = json.loads(body)
    except ValueError:
        data = {}
    error = data.get("error", data) if isinstance(data, dict) else {}
    error = error if isinstance(error, dict) else {"message": str(error)}
    message = str(error.get("message") or body[:500].decode(errors="replace") or "model backend error")
    status = response.status_code if 400 <= response.status_code < 500 else 502
    type_ = error.get("type") if isinstance(error.get("type"), str) else "invalid_request_error"
    code = error.get("code") if isinstance(error.get("code"), str) else f"backend_{response.status_code}"
    param = error.get("param") if isinstance(error.get("param"), str) else None
    return UpstreamError(status, message, type_=type_ if status < 500 else "server_error", code=code, param=param)


# A connection pool (and adapter-load locks) per event loop: one loop per API process, but tests
# start several, and neither pools nor asyncio locks may cross loops. Weak keys: a finished loop's
# entries go with it.
_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()
_LOAD_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], asyncio.Lock]] = (
    weakref.WeakKeyDictionary())


def http_client(settings: Settings | None = None) -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    client = _CLIENTS.get(loop)
    if client is None or client.is_closed:
        settings = settings or get_settings()
        client = _CLIENTS[loop] = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.model_request_timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128))
    return client


async def close_http_clients() -> None:
    """For an app's shutdown: close this loop's connection pool."""
    client = _CLIENTS.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()


def _load_lock(url: str, name: str) -> asyncio.Lock:
    locks = _LOAD_LOCKS.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault((url, name), asyncio.Lock())


class ModelBackend(ABC):
    """One model on one backend. `post` answers JSON, `stream` yields the SSE bytes as they come."""

    def __init__(self, client: httpx.AsyncClient, route: BackendRoute, model: ServedModelInfo) -> None:
        self.client = client
        self.route = route
        self.model = model

    async def _send(self, path: str, body: dict[str, Any], *, stream: bool) -> httpx.Response:
        url = f"{self.route.url}{path}"
        try:
            return await self.client.send(self.client.build_request("POST", url, json=body), stream=stream)
        except httpx.HTTPError as exc:
            raise _unreachable(self.route.url, exc) from exc

    async def _open(self, path: str, body: dict[str, Any], *, stream: bool) -> httpx.Response:
        """The backend's 2xx response (a stream still open when `stream`), or its error raised."""
        response = await self._send(path, body, stream=stream)
        if response.status_code < 400:
            return response
        content = await response.aread()
        await response.aclose()
        raise _refusal(response, content)

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        response = await self._open(path, body, stream=False)
        try:
            return response.json()
        except ValueError as exc:
            raise UpstreamError(502, "the model backend answered something that is not JSON") from exc

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """Opens the stream now (so errors surface before any byte is sent), then passes it through."""
        response = await self._open(path, body, stream=True)

        async def passthrough() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            except httpx.HTTPError:
                # Headers are sent; the client sees the stream end without [DONE].
                return
            finally:
                await response.aclose()

        return passthrough()

    @abstractmethod
    async def generate(self, inputs: str, parameters: GenerateParameters, n: int) -> list[dict[str, Any]]:
        """The `[INST]` endpoint: each backend tokenizes raw text its own way (one BOS, no template)."""


class EmbeddedBackend(ModelBackend):
    async def generate(self, inputs: str, parameters: GenerateParameters, n: int) -> list[dict[str, Any]]:
        params = parameters.model_dump(exclude_unset=True, exclude={"best_of", "rerank"})
        params["num_return_sequences"] = n
        return await self.post(f"/v1/models/{self.model.name}/generate", {"inputs": inputs, "parameters": params})


class VllmBackend(ModelBackend):
    _bos_ids: dict[tuple[str, str], list[int]] = {}  # (vLLM URL, base model) -> [BOS] or []

    async def _open(self, path: str, body: dict[str, Any], *, stream: bool) -> httpx.Response:
        try:
            return await super()._open(path, body, stream=stream)
        except UpstreamError as exc:
            if exc.status_code != 404 or self.route.adapter_path is None:
                raise
        await load_adapter(self.client, self.route.url, self.model.name, self.route.adapter_path)
        return await super()._open(path, body, stream=stream)

    async def _prompt_ids(self, inputs: str) -> list[int]:
        """`inputs` tokenized as given, with exactly one BOS (the tokenizer's, if it has one)."""
        key = (self.route.url, self.model.base_model)
        if key not in self._bos_ids:
            empty = await self.post("/tokenize", {"model": self.model.name, "prompt": "", "add_special_tokens": True})
            self._bos_ids[key] = list(empty.get("tokens", []))[:1]
        tokens = (await self.post("/tokenize", {"model": self.model.name, "prompt": inputs,
                                                "add_special_tokens": False}))["tokens"]
        bos = self._bos_ids[key]
        if not bos:
            return list(tokens)
        start = 0
        while start < len(tokens) and tokens[start] == bos[0]:
            start += 1
        return bos + list(tokens[start:])

    async def generate(self, inputs: str, parameters: GenerateParameters, n: int) -> list[dict[str, Any]]:
        ids = await self._prompt_ids(inputs)
        body: dict[str, Any] = {"model": self.model.name, "prompt": ids, "n": n,
                                "max_tokens": parameters.max_new_tokens, "stop": parameters.stop or None}
        if parameters.sampling:
            body.update(temperature=1.0 if parameters.temperature is None else parameters.temperature)
            if parameters.top_p is not None:
                body["top_p"] = parameters.top_p
            if parameters.top_k:
                body["top_k"] = parameters.top_k
        else:
            body["temperature"] = 0.0
        if parameters.seed is not None:
            body["seed"] = parameters.seed
        if parameters.repetition_penalty is not None:
            body["repetition_penalty"] = parameters.repetition_penalty
        answer = await self.post("/v1/completions", body)
        outputs = []
        for choice in sorted(answer["choices"], key=lambda c: c["index"]):
            text = choice["text"]
            out: dict[str, Any] = {"generated_text": inputs + text if parameters.return_full_text else text}
            if parameters.details or parameters.decoder_input_details:
                reason = {"stop": "eos_token", "length": "length"}.get(choice.get("finish_reason"), "stop_sequence")
                details: dict[str, Any] = {"finish_reason": reason, "seed": parameters.seed,
                                           "generated_tokens": None}
                if parameters.decoder_input_details:
                    details["prefill"] = [{"id": i} for i in ids]
                out["details"] = details
            outputs.append(out)
        return outputs


async def load_adapter(client: httpx.AsyncClient, url: str, name: str, path: str) -> None:
    """Make vLLM at `url` serve the adapter at `path` as model `name`. Idempotent: an adapter
    already loaded under that name is success; concurrent first requests load it once."""
    async with _load_lock(url, name):
        try:
            listed = await client.get(f"{url}/v1/models")
            if listed.status_code == 200 and any(m.get("id") == name for m in listed.json().get("data", [])):
                return
            response = await client.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        except httpx.HTTPError as exc:
            raise _unreachable(url, exc) from exc
        if response.status_code == 200 or (response.status_code == 400 and "already" in response.text):
            return
        error = _refusal(response, response.content)
        raise UpstreamError(502, f"vLLM at {url} could not load the adapter of {name!r}: {error.message}",
                            code="adapter_load_failed")


def backend_for(model: ServedModelInfo, settings: Settings | None = None) -> ModelBackend:
    settings = settings or get_settings()
    route = route_for(model, settings)
    kind = VllmBackend if route.kind == "vllm" else EmbeddedBackend
    return kind(http_client(settings), route, model)
