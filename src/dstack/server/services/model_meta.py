"""Finding a model's chat template and special tokens, so `format: tgi` needs no typing.

Sources, in order: the service's `model` mapping; a local directory's `tokenizer_config.json`;
a local GGUF file (or the built-in SmolLM2) through its metadata; a Hugging Face repository's
`tokenizer_config.json`. When none has a template, the run is refused before it starts.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ChatMetadata:
    chat_template: str | None = None
    eos_token: str | None = None
    bos_token: str | None = None


class ModelMetadataError(Exception):
    pass


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def from_tokenizer_config(data: dict[str, Any]) -> ChatMetadata:
    template = data.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return ChatMetadata(template, _token_text(data.get("eos_token")), _token_text(data.get("bos_token")))


def _from_local(name: str) -> ChatMetadata | None:
    from dstack.serving.models import _BUILTIN_NAMES, builtin_model_path  # noqa: PLC2701

    path = Path(name).expanduser()
    if name.lower() in _BUILTIN_NAMES:
        path = builtin_model_path()
    if path.is_dir():
        cfg = path / "tokenizer_config.json"
        if cfg.is_file():
            return from_tokenizer_config(json.loads(cfg.read_text()))
        ggufs = sorted(path.glob("*.gguf"))
        if not ggufs:
            return None
        path = ggufs[0]
    if path.is_file() and path.suffix.lower() == ".gguf":
        from dstack.serving.gguf import read_chat_metadata

        template, bos, eos = read_chat_metadata(path)
        return ChatMetadata(template, eos, bos)
    return None


def _from_hub(repo_id: str) -> ChatMetadata:
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id, "tokenizer_config.json", etag_timeout=5)
    except Exception as e:  # offline, no such repo, gated, ...
        raise ModelMetadataError(
            f"could not read tokenizer_config.json of '{repo_id}' from Hugging Face ({type(e).__name__})"
        ) from e
    return from_tokenizer_config(json.loads(Path(path).read_text()))


def resolve_chat_metadata(name: str, chat_template: str | None, eos_token: str | None) -> ChatMetadata:
    """The template and tokens for `name`; raises ModelMetadataError saying which property to set."""
    if chat_template and eos_token:
        return ChatMetadata(chat_template, eos_token)
    found = None
    reason = None
    try:
        found = _from_local(name)
        if found is None and "/" in name and not name.startswith(("/", ".", "~")):
            found = _from_hub(name)
    except ModelMetadataError as e:
        reason = str(e)
    except Exception as e:  # a damaged local file
        reason = f"could not read the model's metadata: {e}"
    meta = ChatMetadata(
        chat_template or (found.chat_template if found else None),
        eos_token or (found.eos_token if found else None),
        found.bos_token if found else None,
    )
    if not meta.chat_template:
        why = reason or f"model '{name}' has no chat template in its metadata"
        raise ModelMetadataError(f"{why}; set model.chat_template (and model.eos_token) in the service configuration")
    return meta
