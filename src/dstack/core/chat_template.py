"""Rendering OpenAI chat messages into a prompt with the model's Jinja2 chat template.

One renderer for the built-in engine's `/v1/chat/completions` and the proxy's OpenAI → TGI
mapping, so a template renders the same prompt on both paths. The template comes from the model
file, i.e. from whoever published the model, so it runs in Jinja2's immutable sandbox.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a GGUF carries no template: ChatML, which most instruction-tuned models understand.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """The messages can't be rendered with this template (the message is for the client)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> Any:
    """Compiled once per template text: the proxy renders with the same template on every request."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e}") from e


class ChatTemplate:
    """A compiled chat template with the special tokens it may refer to."""

    def __init__(self, template: str, bos_token: str | None = None, eos_token: str | None = None) -> None:
        self._template = _compile(template)
        self.source = template
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        messages = [{**m, "content": message_text(m.get("content"))} if isinstance(m, dict) else m for m in messages]
        try:
            rendered: str = self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **kwargs,
            )
            return rendered
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e}") from e


def message_text(content: Any) -> str:
    """OpenAI message content is a string or a list of parts; keep the text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict):
                if part.get("type", "text") != "text":
                    raise ChatTemplateError(f"message content of type {part.get('type')!r} is not supported")
                texts.append(str(part.get("text", "")))
            else:
                texts.append(str(part))
        return "".join(texts)
    return str(content)
