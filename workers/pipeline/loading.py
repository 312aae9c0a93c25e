"""Opening user-named models safely: names via `resolve_model_name`, safetensors only, no remote code.

Every loader maps library failures to the pipeline's domain errors so a user sees `model_not_found`,
`model_not_loadable` or `tokenizer_missing` instead of a stack trace.

A round opens the same few models several times (the policy to generate, again as the base to
evaluate against, the reward model every round), so loaded objects are kept in two small in-process
LRU caches keyed by what they were read from, file sizes, mtimes and inodes included (a directory
rewritten in place or replaced by a rename is a new key, and the stale entry is dropped):

- tokenizers: one pristine copy per directory; `load_tokenizer` hands out a deep copy, so a caller
  that edits its tokenizer (chat template, padding side) never affects another.
- inference models (`inference_policy`, and the reward models in `score`): frozen (`eval()`, no
  gradients) and shared as they are. The trainer never gets one: training loads its own weights with
  `load_causal_lm` / `load_policy`, which always read from disk. Before training on a GPU the round
  drops the cached GPU-resident models (`model_cache.evict_accelerator_models()`), so the cache
  never competes with the trainer for GPU memory.

Both caches are bounded by entry count, so a long-lived worker holds at most a few models whatever
number of rounds and jobs it runs.
"""

from __future__ import annotations

import copy
import os
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Any

from app.core.model_names import ModelNameError, ResolvedModel, resolve_model_name
from workers.errors import GpuOutOfMemory, ModelNotFound, ModelNotLoadable, TokenizerMissing

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spm.model")


def resolve(name: str, model_root: Path) -> ResolvedModel:
    try:
        return resolve_model_name(name, model_root)
    except ModelNameError as exc:
        raise ModelNotFound(str(exc), data={"model": name}) from exc


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def compute_device() -> str:
    return "cuda" if has_gpu() else "cpu"


def training_dtype() -> Any:
    """bf16 on a GPU that supports it, fp32 on CPU (CPU bf16 matmuls are slow and lossy here)."""
    import torch

    if has_gpu() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@contextmanager
def oom_as_domain_error() -> Iterator[None]:
    """Turn CUDA OOM into `gpu_out_of_memory` (other exceptions pass through untouched)."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        raise GpuOutOfMemory(f"GPU out of memory: {exc}".splitlines()[0]) from exc


def location_fingerprint(location: str | Path) -> tuple[Hashable, ...]:
    """What a cached load depends on: the directory's identity and each file's size, mtime and inode.

    Atomic writers replace a directory by renaming a new one over it (new inode), and an in-place
    rewrite changes sizes or mtimes, so either gives a different fingerprint. A hub id (not a local
    directory) is its own fingerprint: the hub cache is immutable per revision."""
    path = Path(location)
    if not path.is_dir():
        return (str(location),)
    resolved = path.resolve()
    directory = resolved.stat()
    files = []
    with os.scandir(resolved) as entries:
        for entry in entries:
            if entry.is_file():
                st = entry.stat()
                files.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return (str(resolved), directory.st_ino, directory.st_mtime_ns, tuple(sorted(files)))


@dataclass
class _CacheEntry:
    value: Any
    identity: Hashable  # the key without the fingerprints: a newer fingerprint replaces the entry
    device: str
    nbytes: int


def _nbytes(value: Any, depth: int = 0) -> int:
    """Parameter and buffer bytes of a torch module, or of the modules a loaded-model record holds."""
    if callable(getattr(value, "parameters", None)) and callable(getattr(value, "buffers", None)):
        tensors = list(value.parameters()) + list(value.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)
    if depth < 2 and is_dataclass(value):
        return sum(_nbytes(v, depth + 1) for v in vars(value).values())
    if depth < 2 and isinstance(value, tuple):
        return sum(_nbytes(v, depth + 1) for v in value)
    return 0


class LoadedCache:
    """A small thread-safe LRU of loaded objects. `max_entries=0` disables it (every get loads).

    GPU-resident entries are also bounded in bytes (`max_accelerator_fraction` of the device's
    memory), so cached models never take most of the memory a stage needs."""

    def __init__(self, max_entries: int, max_accelerator_fraction: float = 0.4):
        self.max_entries = max_entries
        self.max_accelerator_fraction = max_accelerator_fraction
        self._entries: OrderedDict[Hashable, _CacheEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def peek(self, identity: Hashable, fingerprint: Hashable) -> Any:
        """The cached value or None, without loading (and without counting a hit or miss)."""
        with self._lock:
            entry = self._entries.get((identity, fingerprint))
            return entry.value if entry is not None else None

    def get(self, identity: Hashable, fingerprint: Hashable, load: Callable[[], Any], *, device: str = "cpu") -> Any:
        """The cached value for `identity` loaded from files matching `fingerprint`, else `load()`'s.

        A load that raises caches nothing; an entry for the same identity with another fingerprint
        (its files were rewritten) is dropped when the new one is stored."""
        key = (identity, fingerprint)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry.value
            self.misses += 1
        value = load()
        if self.max_entries <= 0:
            return value
        on_gpu = not device.startswith("cpu")
        entry = _CacheEntry(value, identity, device, _nbytes(value) if on_gpu else 0)
        budget = self._accelerator_budget(device) if on_gpu else 0
        if on_gpu and entry.nbytes > budget:
            return value  # too big to keep beside what the next stage needs
        with self._lock:
            for stale in [k for k, e in self._entries.items() if e.identity == identity and k != key]:
                del self._entries[stale]
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            if on_gpu:
                while sum(e.nbytes for e in self._entries.values() if e.device == device) > budget:
                    oldest = next(k for k, e in self._entries.items() if e.device == device)
                    del self._entries[oldest]
        return value

    def _accelerator_budget(self, device: str) -> int:
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory
                   * self.max_accelerator_fraction)

    def evict_accelerator_models(self) -> int:
        """Drop the entries that live on a GPU (before training needs the memory); returns how many."""
        with self._lock:
            on_gpu = [k for k, e in self._entries.items() if not e.device.startswith("cpu")]
            for key in on_gpu:
                del self._entries[key]
        if on_gpu:
            import torch

            torch.cuda.empty_cache()
        return len(on_gpu)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> list[Any]:
        with self._lock:
            return [e.value for e in self._entries.values()]


# Per round at most: the policy, the reward model (two causal LMs for an implicit reward) and the
# new policy evaluated, which is the next round's policy. Four keeps all of them, no more.
model_cache = LoadedCache(max_entries=4)
tokenizer_cache = LoadedCache(max_entries=8)


def _load_tokenizer_from_disk(location: str) -> Any:
    from transformers import AutoTokenizer

    path = Path(location)
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise TokenizerMissing(f"model directory {path.name!r} has no tokenizer files")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise TokenizerMissing(f"cannot load the tokenizer of {path.name!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(location: str) -> Any:
    """The tokenizer at `location` (pad token defaulted to EOS), the caller's own copy to edit."""
    pristine = tokenizer_cache.get(("tokenizer", str(location)), location_fingerprint(location),
                                   lambda: _load_tokenizer_from_disk(location))
    try:
        return copy.deepcopy(pristine)
    except (TypeError, copy.Error, pickle.PicklingError):  # a tokenizer type that cannot be copied
        return _load_tokenizer_from_disk(location)


def _check_weights(location: str) -> None:
    path = Path(location)
    if not path.is_dir():
        return
    if not (path / "config.json").is_file():
        raise ModelNotLoadable(f"model directory {path.name!r} has no config.json")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise ModelNotLoadable(f"model {path.name!r} only has pickle weights; safetensors are required")
        raise ModelNotLoadable(f"model directory {path.name!r} has no weights")


def load_causal_lm(location: str, *, dtype: Any = None, device: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    _check_weights(location)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, trust_remote_code=False, use_safetensors=True, dtype=dtype or training_dtype())
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ModelNotLoadable(f"cannot load causal LM {Path(location).name!r}: {exc}") from exc
    return model.to(device or compute_device())


def load_policy(base_location: str, adapter_dir: Path | None, *, dtype: Any = None,
                device: str | None = None, merge: bool = True, trainable: bool = False) -> Any:
    """Base model, plus the cumulative LoRA adapter when given (merged for inference by default)."""
    model = load_causal_lm(base_location, dtype=dtype, device=device)
    if adapter_dir is None:
        return model
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelNotLoadable(f"cannot load the LoRA adapter at {adapter_dir}: {exc}") from exc
    return model.merge_and_unload() if merge else model


def freeze(model: Any) -> Any:
    """Inference only: eval mode and no gradients (a frozen model cannot be trained by mistake)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def inference_policy(base_location: str, adapter_dir: Path | None = None, *, dtype: Any = None,
                     device: str | None = None) -> Any:
    """A frozen, shared model for generation and scoring: the base (+ the adapter, merged).

    Never give it to a trainer or edit its weights: other stages and rounds reuse it. With an
    adapter, a cached base is copied and merged rather than read from disk again; an uncached base
    is read from disk and not cached on its own."""
    dtype = dtype or training_dtype()
    device = device or compute_device()

    def key(adapter: Path | None) -> tuple[Hashable, Hashable]:
        identity = ("policy", str(base_location), str(adapter) if adapter is not None else None, str(dtype), device)
        return identity, (location_fingerprint(base_location),
                          location_fingerprint(adapter) if adapter is not None else None)

    def load() -> Any:
        if adapter_dir is None:
            return freeze(load_causal_lm(base_location, dtype=dtype, device=device))
        base = model_cache.peek(*key(None))
        model = copy.deepcopy(base) if base is not None else load_causal_lm(base_location, dtype=dtype, device=device)
        return freeze(_merge_adapter(model, adapter_dir))

    return model_cache.get(*key(adapter_dir), load, device=device)


def _merge_adapter(model: Any, adapter_dir: Path) -> Any:
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelNotLoadable(f"cannot load the LoRA adapter at {adapter_dir}: {exc}") from exc
    return model.merge_and_unload()
