"""Pure conversion between OpenAI requests/responses and the TGI `/generate` API."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from dstack.core.chat_template import ChatTemplate, ChatTemplateError
from dstack.proxy.registry import ModelInfo


class ConversionError(ValueError):
    """The request cannot be converted; `code` goes into the OpenAI error object."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


def render_chat(model: ModelInfo, messages: list[dict[str, Any]], where: str = "") -> str:
    """The prompt for `messages` through the model's chat template (the engine's renderer)."""
    if not model.chat_template:
        raise ConversionError(
            f"Model '{model.name}'{where} uses format 'tgi' but has no chat template; set `model.chat_template` "
            "(and `model.eos_token`) in the service configuration",
            code="chat_template_missing",
        )
    if not isinstance(messages, list) or not messages:
        raise ConversionError("'messages' must be a non-empty list", param="messages")
    try:
        return ChatTemplate(model.chat_template, model.bos_token, model.eos_token).render(messages)
    except ChatTemplateError as e:
        raise ConversionError(f"The chat template rejected the messages: {e}", code="chat_template_error") from e


def stop_list(req: dict[str, Any], model: ModelInfo) -> list[str]:
    stop = req.get("stop")
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if isinstance(s, str) and s]
    if model.eos_token and model.eos_token not in stops:
        stops.append(model.eos_token)
    return stops


def tgi_parameters(req: dict[str, Any], stops: list[str], stream: bool) -> dict[str, Any]:
    """OpenAI sampling fields → TGI `parameters`."""
    p: dict[str, Any] = {"details": True}
    max_tokens = req.get("max_tokens") or req.get("max_completion_tokens")
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ConversionError("'max_tokens' must be a positive integer", param="max_tokens")
        p["max_new_tokens"] = max_tokens
    t = req.get("temperature")
    if t is not None and t > 0:
        p["temperature"] = t
        p["do_sample"] = True
    top_p = req.get("top_p")
    if top_p is not None and 0 < top_p < 1:
        p["top_p"] = top_p
        p["do_sample"] = True
    if req.get("seed") is not None:
        p["seed"] = req["seed"]
    n = req.get("n") or 1
    if n > 1 and not stream:
        p["best_of"] = n
        p["do_sample"] = True
        p.pop("seed", None)
    if stops:
        p["stop"] = stops
    return p


def finish_reason(tgi_reason: str | None) -> str:
    return "length" if tgi_reason == "length" else "stop"


def trim_stop(text: str, stops: list[str]) -> str:
    """Cut before the first stop string: TGI keeps it (and the rest of its token), OpenAI does not."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


def completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def full_response(chat: bool, model: str, text: str, reason: str, use: dict[str, int]) -> dict[str, Any]:
    choice: dict[str, Any]
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    return {
        "id": completion_id(chat),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": use,
    }


class StreamConverter:
    """TGI stream events → OpenAI chunks, holding back text that may turn out to be a stop string."""

    def __init__(
        self, chat: bool, model: str, stops: list[str], include_usage: bool, prompt_tokens: int | None
    ) -> None:
        self.chat = chat
        self.model = model
        self.stops = stops
        self.max_stop = max((len(s) for s in stops), default=0)
        self.include_usage = include_usage
        self.prompt_tokens = prompt_tokens
        self.id = completion_id(chat)
        self.created = int(time.time())
        self.text = ""
        self.emitted = 0
        self.tokens = 0

    def _chunk(self, content: str | None, reason: str | None, role: bool = False) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if content is not None:
                delta["content"] = content
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": reason}
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.include_usage:
            obj["usage"] = None
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    def start(self) -> bytes:
        return self._chunk("", None, role=True) if self.chat else b""

    def _held(self) -> int:
        """How many trailing characters could still be the start of a stop string."""
        text = self.text
        for k in range(min(len(text), self.max_stop), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def event(self, ev: dict[str, Any]) -> tuple[bytes, bool]:
        """One TGI event → bytes to send, and whether the stream is over."""
        token = ev.get("token") or {}
        details = ev.get("details")
        final = details is not None or ev.get("generated_text") is not None
        if token:
            self.tokens += 1
            if not token.get("special"):
                self.text += token.get("text", "")
        out = b""
        if not final:
            safe = len(self.text) - self._held()
            if safe > self.emitted:
                out = self._chunk(self.text[self.emitted : safe], None)
                self.emitted = safe
            return out, False
        details = details or {}
        reason = finish_reason(details.get("finish_reason"))
        text = trim_stop(self.text, self.stops) if reason == "stop" else self.text
        rest = text[self.emitted :] if len(text) > self.emitted else ""
        out = self._chunk(rest if rest else (None if self.chat else ""), reason)
        completion = details.get("generated_tokens", self.tokens)
        prompt = details.get("input_length", self.prompt_tokens) or 0
        if self.include_usage:
            obj = {
                "id": self.id,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage(prompt, completion),
            }
            out += b"data: " + json.dumps(obj).encode() + b"\n\n"
        return out + b"data: [DONE]\n\n", True


def error_object(
    message: str, type_: str = "invalid_request_error", code: Any = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def tgi_error(status: int, body: bytes) -> dict[str, Any]:
    """A TGI error body (`{"error", "error_type"}`) as an OpenAI error object."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and "error" in data:
        msg = data["error"] if isinstance(data["error"], str) else json.dumps(data["error"])
        return error_object(msg, str(data.get("error_type") or "upstream_error"), status)
    text = body.decode("utf-8", "replace")[:500] or f"HTTP {status}"
    return error_object(f"The model server answered {status}: {text}", "upstream_error", status)
