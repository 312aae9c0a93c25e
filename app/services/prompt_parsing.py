"""Parse an uploaded prompt set (JSONL, CSV or Parquet) into normalised chat prompts.

Each prompt becomes a list of messages whose last one is the user's turn. Every failure names
what is wrong (and the line or row) so the user can fix the file.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from app.core.errors import UnprocessableRequest

ROLES = {"system", "user", "assistant"}
Messages = list[dict[str, str]]


def _bad(message: str, code: str = "invalid_file") -> UnprocessableRequest:
    return UnprocessableRequest(message, param="file", code=code)


def detect_format(filename: str | None, content_type: str | None, data: bytes) -> str:
    name = (filename or "").lower()
    if name.endswith(".parquet") or data[:4] == b"PAR1":
        return "parquet"
    if name.endswith(".csv") or (content_type or "").startswith("text/csv"):
        return "csv"
    return "jsonl"


def _check_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{where}: expected a string, got {type(value).__name__ if value is not None else 'nothing'}")
    if "\x00" in value:
        raise _bad(f"{where}: NUL characters are not allowed", code="nul_byte")
    if not value.strip():
        raise _bad(f"{where}: empty prompt")
    return value


def normalise_record(record: Any, where: str) -> Messages:
    if not isinstance(record, dict):
        raise _bad(f"{where}: expected an object with 'prompt' or 'messages'")
    if record.get("prompt") is not None or "messages" not in record:
        return [{"role": "user", "content": _check_text(record.get("prompt"), f"{where}: prompt")}]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad(f"{where}: expected a 'prompt' string or a non-empty 'messages' list")
    out: Messages = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise _bad(f"{where}: messages[{i}] needs a role in {sorted(ROLES)} and a content string")
        out.append({"role": message["role"], "content": _check_text(message.get("content"),
                                                                     f"{where}: messages[{i}].content")})
    if out[-1]["role"] != "user":
        raise _bad(f"{where}: the last message must be the user's")
    return out


def _decode(data: bytes) -> str:
    if b"\x00" in data:
        raise _bad("the file contains NUL bytes", code="nul_byte")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _bad(f"the file is not valid UTF-8 (byte {exc.start})", code="invalid_encoding") from exc


def parse_jsonl(data: bytes) -> list[Messages]:
    prompts = []
    for number, line in enumerate(_decode(data).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad(f"line {number}: malformed JSON ({exc.msg})", code="malformed_jsonl") from exc
        prompts.append(normalise_record(record, f"line {number}"))
    return prompts


def parse_csv(data: bytes) -> list[Messages]:
    try:
        reader = csv.DictReader(io.StringIO(_decode(data), newline=""))
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise _bad("CSV needs a 'prompt' column")
        return [normalise_record({"prompt": row.get("prompt")}, f"row {n}")
                for n, row in enumerate(reader, start=2)]
    except csv.Error as exc:
        raise _bad(f"malformed CSV: {exc}") from exc


def parse_parquet(data: bytes) -> list[Messages]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 — pyarrow raises many types for a bad file
        raise _bad(f"unreadable Parquet file: {exc}") from exc
    columns = set(table.column_names)
    if "prompt" not in columns and "messages" not in columns:
        raise _bad("Parquet needs a 'prompt' or 'messages' column")
    return [normalise_record(row, f"row {n}") for n, row in enumerate(table.to_pylist(), start=1)]


def parse_prompt_file(data: bytes, *, filename: str | None, content_type: str | None) -> tuple[str, list[Messages]]:
    fmt = detect_format(filename, content_type, data)
    prompts = {"jsonl": parse_jsonl, "csv": parse_csv, "parquet": parse_parquet}[fmt](data)
    if not prompts:
        raise _bad("the prompt set is empty", code="empty_prompt_set")
    return fmt, prompts
