"""Text generation for the embedded model server: transformers on CPU (or one GPU).

Models are loaded from the model root and the artifact store with the pipeline's safe loaders
(safetensors, `trust_remote_code=False`); a LoRA adapter is merged into its base for speed. A few
models stay loaded (LRU). One generation runs at a time on a dedicated thread, so the event loop
stays free to stream and to accept requests; streamed tokens cross back through a queue.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.pipeline.loading import load_policy, load_tokenizer


@dataclass(frozen=True)
class ModelSource:
    """What to load for a served name: a base (hub id or directory) plus an adapter, or a full model."""

    name: str
    base_location: str
    adapter_dir: Path | None = None


@dataclass
class LoadedModel:
    source: ModelSource
    model: Any
    tokenizer: Any
    eos_ids: list[int]
    pad_id: int
    max_length: int | None

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = None
    min_new_tokens: int = 0
    ignore_eos: bool = False
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


@dataclass
class Completion:
    """One generated answer: token ids, text (cut before a stop string), and why it ended."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # OpenAI's: "stop" (EOS or a stop string) | "length"
    stopped_by: str | None = None  # TGI's: "eos_token" | "stop_sequence" | "length"
    emitted: int = 0  # characters of `text` already streamed

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StreamUpdate:
    row: int
    text: str  # new text of answer `row`
    finish_reason: str | None  # set once, on the answer's last update
    tokens: int  # tokens answer `row` has generated so far


class ContextTooLong(ValueError):
    """The prompt plus the requested tokens do not fit the model's context."""


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def load_model(source: ModelSource) -> LoadedModel:
    tokenizer = load_tokenizer(source.base_location)
    model = load_policy(source.base_location, source.adapter_dir)
    model.eval()
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    max_length = getattr(model.config, "max_position_embeddings", None)
    return LoadedModel(source=source, model=model, tokenizer=tokenizer, eos_ids=eos_ids, pad_id=pad_id,
                       max_length=max_length)


class ModelCache:
    """Up to `size` loaded models, least recently used evicted; loads of one name happen once."""

    def __init__(self, size: int, loader: Callable[[ModelSource], LoadedModel] = load_model) -> None:
        self.size = size
        self.loader = loader
        self._models: OrderedDict[ModelSource, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, source: ModelSource) -> LoadedModel:
        with self._lock:
            if source in self._models:
                self._models.move_to_end(source)
                return self._models[source]
            loaded = self.loader(source)
            self._models[source] = loaded
            while len(self._models) > self.size:
                self._models.popitem(last=False)
            return loaded

    def loaded_names(self) -> list[str]:
        return [s.name for s in self._models]


class _Decoder:
    """Turns the token ids of n parallel answers into text as they grow, honouring EOS, stop
    strings and the token budget; text that might still become a stop string is held back."""

    def __init__(self, loaded: LoadedModel, options: SamplingOptions) -> None:
        self.loaded = loaded
        self.options = options
        self.completions = [Completion() for _ in range(options.n)]
        self.hold_back = max((len(s) for s in options.stop), default=1) - 1

    def add(self, row: int, token: int) -> None:
        c = self.completions[row]
        if c.done:
            return
        if token in self.loaded.eos_ids and not self.options.ignore_eos:
            c.finish_reason, c.stopped_by = "stop", "eos_token"
            return
        c.token_ids.append(token)
        c.text = self.loaded.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        cut = min((i for i in (c.text.find(s) for s in self.options.stop) if i >= 0), default=-1)
        if cut >= 0:
            c.text = c.text[:cut]
            c.finish_reason, c.stopped_by = "stop", "stop_sequence"
        elif len(c.token_ids) >= self.options.max_new_tokens:
            c.finish_reason, c.stopped_by = "length", "length"

    def finish(self) -> None:
        for c in self.completions:
            if not c.done:
                c.finish_reason, c.stopped_by = "length", "length"

    def new_text(self, row: int) -> str:
        """Text of `row` not yet handed out and safe to hand out."""
        c = self.completions[row]
        safe = len(c.text) if c.done else max(c.emitted, len(c.text) - self.hold_back)
        delta = c.text[c.emitted:safe]
        c.emitted = max(c.emitted, safe)
        return delta


class _StepStreamer:
    """transformers' streamer protocol: `put` gets the prompt first, then one token per row per step."""

    def __init__(self, on_step: Callable[[list[int]], None]) -> None:
        self.on_step = on_step
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.on_step(value.reshape(-1).tolist())

    def end(self) -> None:
        return None


class _StopWhenDecoded:
    """A stopping criterion: a row is finished once the decoder says so (a stop string, which
    transformers' own `stop_strings` cannot match on every tokenizer), and every row once the
    client went away (a dropped stream). The decoder lags one step behind: one spare token."""

    def __init__(self, decoder: _Decoder, event: threading.Event) -> None:
        self.decoder = decoder
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        rows = input_ids.shape[0]
        if self.event.is_set():
            return torch.ones(rows, dtype=torch.bool, device=input_ids.device)
        done = [c.done for c in self.decoder.completions][:rows]
        done += [False] * (rows - len(done))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """Runs generations one at a time on its own thread."""

    def __init__(self, cache: ModelCache) -> None:
        self.cache = cache
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def load(self, source: ModelSource) -> LoadedModel:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.cache.get, source)

    def check_length(self, loaded: LoadedModel, prompt_ids: list[int], max_new_tokens: int) -> None:
        if loaded.max_length is not None and len(prompt_ids) + max_new_tokens > loaded.max_length:
            raise ContextTooLong(f"This model's maximum context length is {loaded.max_length} tokens; the prompt "
                                 f"has {len(prompt_ids)} and {max_new_tokens} more were requested")

    def _run(self, loaded: LoadedModel, prompt_ids: list[int], options: SamplingOptions, decoder: _Decoder,
             on_step: Callable[[list[int]], None], stop: threading.Event) -> None:
        import torch
        from transformers import StoppingCriteriaList

        device = next(loaded.model.parameters()).device
        input_ids = torch.tensor([prompt_ids], device=device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": options.max_new_tokens, "pad_token_id": loaded.pad_id,
            "eos_token_id": loaded.eos_ids, "do_sample": options.sampling,
            "num_return_sequences": options.n if options.sampling else 1,
            "streamer": _StepStreamer(on_step),
            "stopping_criteria": StoppingCriteriaList([_StopWhenDecoded(decoder, stop)]),
        }
        # EOS is suppressed until min_new_tokens: `ignore_eos` is min_new_tokens = max_new_tokens.
        min_new_tokens = options.max_new_tokens if options.ignore_eos else options.min_new_tokens
        if min_new_tokens:
            kwargs["min_new_tokens"] = min(min_new_tokens, options.max_new_tokens)
        if options.sampling:
            kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
        if options.repetition_penalty is not None:
            kwargs["repetition_penalty"] = options.repetition_penalty
        if options.seed is not None:
            torch.manual_seed(options.seed)
        with torch.inference_mode():
            loaded.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)

    def _decoder_step(self, decoder: _Decoder, options: SamplingOptions) -> Callable[[list[int]], None]:
        def step(tokens: list[int]) -> None:
            if not options.sampling and options.n > 1:  # greedy: one answer, n copies
                tokens = tokens * options.n
            for row, token in enumerate(tokens[:options.n]):
                decoder.add(row, token)

        return step

    async def generate(self, loaded: LoadedModel, prompt_ids: list[int], options: SamplingOptions) -> list[Completion]:
        decoder = _Decoder(loaded, options)
        await asyncio.get_running_loop().run_in_executor(
            self._executor, self._run, loaded, prompt_ids, options, decoder, self._decoder_step(decoder, options),
            threading.Event())
        decoder.finish()
        return decoder.completions

    async def stream(self, loaded: LoadedModel, prompt_ids: list[int],
                     options: SamplingOptions) -> AsyncIterator[list[StreamUpdate]]:
        """Yields, per step, an update for each answer with new text or that just finished."""
        loop = asyncio.get_running_loop()
        decoder = _Decoder(loaded, options)
        steps: asyncio.Queue[list[StreamUpdate] | None] = asyncio.Queue()
        stop = threading.Event()
        decode = self._decoder_step(decoder, options)
        reported: set[int] = set()

        def updates() -> list[StreamUpdate]:
            out = []
            for row, c in enumerate(decoder.completions):
                delta = decoder.new_text(row)
                finished = c.done and row not in reported
                if finished:
                    reported.add(row)
                if delta or finished:
                    out.append(StreamUpdate(row, delta, c.finish_reason if finished else None, len(c.token_ids)))
            return out

        def on_step(tokens: list[int]) -> None:
            decode(tokens)
            update = updates()
            if update:
                loop.call_soon_threadsafe(steps.put_nowait, update)

        def run() -> None:
            try:
                self._run(loaded, prompt_ids, options, decoder, on_step, stop)
            finally:
                decoder.finish()
                loop.call_soon_threadsafe(steps.put_nowait, updates())
                loop.call_soon_threadsafe(steps.put_nowait, None)

        future = loop.run_in_executor(self._executor, run)
        try:
            while (update := await steps.get()) is not None:
                if update:
                    yield update
            await future
        finally:
            stop.set()  # the client went away mid-stream: stop spending compute on it
