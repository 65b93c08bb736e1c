"""A minimal reader for GGUF metadata (the key/value header), in pure Python.

Used to get the chat template and special tokens of a model without loading llama.cpp, so the
proxy can render chat prompts on a host that has no inference engine installed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

GGUF_MAGIC = b"GGUF"

# value type ids from the GGUF specification
_SCALARS: dict[int, str] = {
    0: "<B",  # uint8
    1: "<b",  # int8
    2: "<H",  # uint16
    3: "<h",  # int16
    4: "<I",  # uint32
    5: "<i",  # int32
    6: "<f",  # float32
    7: "<?",  # bool
    10: "<Q",  # uint64
    11: "<q",  # int64
    12: "<d",  # float64
}
_STRING = 8
_ARRAY = 9


class GGUFError(ValueError):
    """The file is not a GGUF file or its header is damaged."""


class _Reader:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFError("unexpected end of file in GGUF header")
        return data

    def u32(self) -> int:
        return struct.unpack("<I", self.read(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.read(8))[0]

    def string(self) -> str:
        return self.read(self.u64()).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.f.seek(self.u64(), 1)

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]
        if vtype == _STRING:
            if keep:
                return self.string()
            self.skip_string()
            return None
        if vtype == _ARRAY:
            item_type = self.u32()
            count = self.u64()
            if item_type in _SCALARS:
                size = struct.calcsize(_SCALARS[item_type])
                if not keep:
                    self.f.seek(size * count, 1)
                    return None
                raw = self.read(size * count)
                return list(struct.unpack("<" + _SCALARS[item_type][1] * count, raw))
            items = [self.value(item_type, keep) for _ in range(count)]
            return items if keep else None
        raise GGUFError(f"unknown GGUF value type {vtype}")


def read_metadata(path: str | Path, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """Read the metadata of a GGUF file; with `keys`, only those values are decoded (fast)."""
    wanted: Callable[[str], bool] | None = None
    if keys is not None:
        key_set = set(keys)
        wanted = key_set.__contains__
    result: dict[str, Any] = {}
    with open(path, "rb") as f:
        r = _Reader(f)
        if r.read(4) != GGUF_MAGIC:
            raise GGUFError(f"{path} is not a GGUF file")
        version = r.u32()
        if version < 2:
            raise GGUFError(f"GGUF version {version} is not supported")
        r.u64()  # tensor count
        n_kv = r.u64()
        for _ in range(n_kv):
            key = r.string()
            vtype = r.u32()
            keep = wanted is None or wanted(key)
            value = r.value(vtype, keep)
            if keep:
                result[key] = value
    return result


def read_chat_metadata(path: str | Path) -> tuple[str | None, str | None, str | None]:
    """Return (chat_template, bos_token, eos_token) from GGUF metadata; None where absent."""
    meta = read_metadata(
        path,
        keys=(
            "tokenizer.chat_template",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
        ),
    )
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []

    def token_text(key: str) -> str | None:
        tid = meta.get(key)
        if tid is None or not (0 <= int(tid) < len(tokens)):
            return None
        return tokens[int(tid)]

    return (
        meta.get("tokenizer.chat_template"),
        token_text("tokenizer.ggml.bos_token_id"),
        token_text("tokenizer.ggml.eos_token_id"),
    )
