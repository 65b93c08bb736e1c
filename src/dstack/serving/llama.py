"""A thin wrapper over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

We use the low-level API, not `llama_cpp.Llama`, because continuous batching needs one context
holding many sequences (in one unified KV buffer, or a KV stream each) decoded together in one call.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import numpy as np


def _import_llama_cpp():  # type: ignore[no-untyped-def]
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("the built-in engine needs llama-cpp-python: pip install 'dstack[serving]'") from e
    return llama_cpp


def physical_cores() -> int:
    """Physical cores: llama.cpp runs fastest with one thread per core, not per hyperthread."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return max(1, min(n, len(os.sched_getaffinity(0))))
    except Exception:
        pass
    return max(1, (os.cpu_count() or 2) // 2)


# --- weight repacking ------------------------------------------------------------------------
# llama.cpp's CPU backend may keep weights in "extra" buffer types that repack them for faster
# kernels: CPU_REPACK (interleaved Q4_0/IQ4_NL/Q8_0 for AVX2, AVX-512 and NEON) and, in builds for
# Intel AMX hosts, AMX (tile-friendly Q4_0/Q4_1/Q8_0/Q4_K/... layouts). The AMX path crashes at the
# first decode (SIGSEGV in ggml_backend_amx_mul_mat, llama.cpp's own llama-server too) on the
# Sapphire Rapids class of Xeons with the quantisations we ship, and llama.cpp offers no switch
# for AMX alone: `use_extra_bufts` turns every extra type on or off together. So the choice is:
# - "auto" (default): extra buffer types are used unless this build actually offers the AMX type
#   (compiled for AMX *and* the kernel granted the tile state). On AMX hosts we give up CPU_REPACK
#   too; bench/serving/RESULTS-serving.md measures what that costs where repacking helps (Q4_0).
# - "on" / "off": forced, for hosts where the user knows better (DSTACK_SERVING_REPACK or
#   `--weight-repack`).
REPACK_MODES = ("auto", "on", "off")
_CPU_DEVICE = 0  # GGML_BACKEND_DEVICE_TYPE_CPU


def cpu_extra_buffer_types() -> list[str]:
    """Names of the extra buffer types this llama.cpp build's CPU backend offers (e.g. AMX)."""
    try:
        from llama_cpp._ggml import libggml as lib
    except Exception:  # pragma: no cover - an unusual build layout: assume none
        return []
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    lib.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_buft_name.restype = ctypes.c_char_p
    lib.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    dev = lib.ggml_backend_dev_by_type(_CPU_DEVICE)
    if not dev:
        return []
    reg = lib.ggml_backend_dev_backend_reg(dev)
    addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not addr:
        return []
    get_extra = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(addr)
    bufts = get_extra(dev)
    names = []
    i = 0
    while bufts and bufts[i]:
        names.append(lib.ggml_backend_buft_name(bufts[i]).decode())
        i += 1
    return names


def use_weight_repacking(mode: str, extra_types: list[str]) -> bool:
    """Whether to let llama.cpp repack weights into its extra buffer types (see above)."""
    if mode not in REPACK_MODES:
        raise ValueError(f"weight repacking must be one of {', '.join(REPACK_MODES)}, not {mode!r}")
    if mode != "auto":
        return mode == "on"
    return "AMX" not in extra_types


class Batch:
    """A `llama_batch` whose arrays are numpy buffers we own, so filling it is vectorised.

    Every token belongs to exactly one sequence: `seq_id[i]` points into a fixed table holding
    the ids 0..n_seq_max-1, so choosing a sequence is writing one pointer.
    """

    def __init__(self, llama_cpp, capacity: int, n_seq_max: int) -> None:  # type: ignore[no-untyped-def]
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        self._ids = np.arange(n_seq_max, dtype=np.int32)
        self._id_addr = self._ids.ctypes.data
        self.seq_ptr = np.zeros(capacity, dtype=np.uintp)
        b = llama_cpp.llama_batch()
        b.n_tokens = 0
        b.token = self.token.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.embd = ctypes.POINTER(ctypes.c_float)()
        b.pos = self.pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(
            ctypes.c_void_p(self.seq_ptr.ctypes.data), ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))
        )
        b.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.struct = b
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, seq_id: int, tokens: list[int] | np.ndarray, pos0: int, logits_last: bool) -> int:
        """Append `tokens` of one sequence at positions pos0...; return the index of the last."""
        k = len(tokens)
        i, j = self.n, self.n + k
        if j > self.capacity:
            raise ValueError("batch overflow")
        self.token[i:j] = tokens
        self.pos[i:j] = np.arange(pos0, pos0 + k, dtype=np.int32)
        self.seq_ptr[i:j] = self._id_addr + 4 * seq_id
        self.logits[i:j] = 0
        if logits_last:
            self.logits[j - 1] = 1
        self.n = j
        return j - 1

    def set_all_logits(self, start: int, end: int) -> None:
        self.logits[start:end] = 1


class LlamaModel:
    """One GGUF model and one llama context with `n_seq_max` independent sequences."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx_per_seq: int,
        n_seq_max: int,
        n_batch: int = 512,
        threads: int | None = None,
        verbose: bool = False,
        kv_unified: bool = False,
        flash_attn: bool = True,
        kv_type: str = "q8_0",
        repack: str = "auto",
    ) -> None:
        llama_cpp = _import_llama_cpp()
        self.lib = llama_cpp
        if not verbose:
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = -1  # harmless on a CPU build, offloads all on a GPU build
        self.extra_buffer_types = cpu_extra_buffer_types()
        self.repack = use_weight_repacking(repack, self.extra_buffer_types)
        mparams.use_extra_bufts = self.repack
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise RuntimeError(f"llama.cpp failed to load {path}")
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        self.n_ctx_per_seq = min(n_ctx_per_seq, self.n_ctx_train) if self.n_ctx_train > 0 else n_ctx_per_seq
        self.n_seq_max = n_seq_max
        self.n_batch = n_batch
        self.kv_unified = kv_unified
        threads = threads or physical_cores()
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.n_ctx_per_seq * n_seq_max
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        # Two KV layouts (see engine.py for how each is scheduled):
        # - unified (kv_unified=True, `--kv-layout unified`): one buffer whose cells are tagged by
        #   sequence id. Any mix of prompt chunks and decode tokens goes through one pass, and a
        #   shared prefix is reused by tagging its cells, not copying them. Not exact: when another
        #   sequence's cells are freed, llama.cpp puts this sequence's next tokens there, below its
        #   older cells, and from then on its logits differ from the exact computation by up to 1.6
        #   (llama.cpp 0.3.36's CPU build, q8_0 and f16 KV; bench/serving/unified_cell_order_check.py
        #   and RESULTS-serving.md). Attention should not depend on cell order; here it does.
        # - one KV stream per sequence (kv_unified=False, the server's default): batch invariant (greedy output identical
        #   whether a request runs alone or with others). A sequence always occupies cells
        #   0..n-1 of its own stream, in position order, whatever else runs;
        # - flash attention with a quantized (q8_0) KV cache: ggml's CPU kernel then always takes
        #   its row-by-row path, which reduces over a query's cells in the same order for any
        #   batch shape. With an f16 cache it switches to a split-KV path for lone decodes over
        #   >=512 cells and to a tiled path for >=64 queries, which round differently.
        # The matrix products (Q4_x/Q8_0 weights) compute each output row independently.
        cparams.kv_unified = kv_unified
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        kv_ggml_type = {"f16": 1, "q8_0": 8}[kv_type]
        cparams.type_k = kv_ggml_type
        cparams.type_v = kv_ggml_type
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise RuntimeError("llama.cpp failed to create a context (out of memory?)")
        self.ctx = ctx
        self.threads = threads
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.batch = Batch(llama_cpp, n_batch, n_seq_max)
        self.eos_id = int(llama_cpp.llama_vocab_eos(self.vocab))
        self.bos_id = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self._pieces: dict[int, bytes] = {}
        self._special_pieces: dict[int, bytes] = {}
        self._eog = np.zeros(self.n_vocab, dtype=bool)
        for t in range(self.n_vocab):
            if llama_cpp.llama_vocab_is_eog(self.vocab, t):
                self._eog[t] = True
        self._control = np.array([bool(llama_cpp.llama_vocab_is_control(self.vocab, t)) for t in range(self.n_vocab)])
        self._logits_fn = llama_cpp.llama_get_logits_ith
        self._decode_fn = llama_cpp.llama_decode

    # --- metadata -------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    # --- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (ctypes.c_int32 * cap)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (ctypes.c_int32 * cap)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token; cached, since decoding a token is on the hot path."""
        cache = self._special_pieces if special else self._pieces
        p = cache.get(token)
        if p is None:
            buf = ctypes.create_string_buffer(64)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self.lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            p = buf.raw[:n]
            cache[token] = p
        return p

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return b"".join(self.piece(t, special) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._eog[token])

    def is_special(self, token: int) -> bool:
        return bool(self._control[token] or self._eog[token])

    # --- compute --------------------------------------------------------------------------
    def decode(self) -> int:
        self.batch.struct.n_tokens = self.batch.n
        return int(self._decode_fn(self.ctx, self.batch.struct))

    def logits(self, i: int) -> np.ndarray:
        """Logits row of batch index i, as a view on llama.cpp's buffer (valid until next decode)."""
        ptr = self._logits_fn(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def clear_seq(self, seq_id: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, seq_id, -1, -1)

    def truncate_seq(self, seq_id: int, n: int) -> None:
        """Keep positions 0..n-1 of a sequence, drop the rest."""
        self.lib.llama_memory_seq_rm(self.memory, seq_id, n, -1)

    def copy_seq(self, src: int, dst: int) -> None:
        """Copy a sequence's whole KV stream over another's; the data moves at the next decode,
        queued copies in the order they were asked for."""
        self.lib.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def save_seq(self, seq_id: int) -> bytes:
        """The KV cells of one sequence (llama.cpp's per-sequence state: its cells only, not the
        whole stream), for `restore_seq`. Reads the cells as they are now: a stream copy still
        queued for the next decode is not in them."""
        size = int(self.lib.llama_state_seq_get_size(self.ctx, seq_id))
        buf = (ctypes.c_uint8 * size)()
        n = int(self.lib.llama_state_seq_get_data(self.ctx, buf, size, seq_id))
        return bytes(memoryview(buf)[:n])

    def restore_seq(self, data: bytes, seq_id: int) -> bool:
        """Write cells saved by `save_seq` into sequence `seq_id` (cleared first); False when
        llama.cpp refuses them (no room in that stream)."""
        self.clear_seq(seq_id)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return int(self.lib.llama_state_seq_set_data(self.ctx, buf, len(data), seq_id)) > 0

    def share_prefix(self, src: int, dst: int, n: int) -> None:
        """Unified KV only: `dst` (empty) gets positions 0..n-1 of `src` by tagging those cells; no data moves."""
        self.lib.llama_memory_seq_cp(self.memory, src, dst, 0, n)

    def move_seq(self, src: int, dst: int) -> None:
        """Move a sequence to another KV stream; the copy happens at the next decode."""
        self.copy_seq(src, dst)
        self.clear_seq(src)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None
