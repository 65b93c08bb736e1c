"""The OpenAI stream's choices, chat and text, from engine events (no model needed)."""

from __future__ import annotations

from dstack.serving.engine import Event, Finish, TokenInfo
from dstack.serving.openai_api import _event_choice, _opening_choices

TOKEN = TokenInfo(5, "Hi", -0.5)
EOS = TokenInfo(2, "</s>", -0.1, special=True)
DONE = Finish("eos_token", "Hi", 2, 3, None)


def test_opening_choices():
    assert _opening_choices(2, None, chat=True) == [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        for i in (0, 1)
    ]
    assert _opening_choices(1, ["echo me"], chat=False) == [
        {"index": 0, "text": "echo me", "logprobs": None, "finish_reason": None}
    ]
    assert _opening_choices(1, None, chat=False) == []


def test_chat_choices():
    assert _event_choice(0, Event(TOKEN, "Hi"), False, chat=True) == {
        "index": 0,
        "delta": {"role": "assistant", "content": "Hi"},
        "logprobs": None,
        "finish_reason": None,
    }
    assert _event_choice(0, Event(TOKEN, ""), False, chat=True) is None  # held back: nothing to send
    held = _event_choice(1, Event(TOKEN, "", top=[TOKEN]), True, chat=True)  # ...unless logprobs are asked for
    assert held is not None and held["logprobs"]["content"][0]["token"] == "Hi" and held["index"] == 1
    end = _event_choice(0, Event(EOS, "", finish=DONE), True, chat=True)
    assert end == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}  # special: no logprobs


def test_text_choices():
    assert _event_choice(3, Event(TOKEN, "Hi"), True, chat=False) == {
        "index": 3,
        "text": "Hi",
        "logprobs": None,
        "finish_reason": None,
    }
    assert _event_choice(0, Event(TOKEN, ""), False, chat=False) is None
    assert _event_choice(0, Event(EOS, "", finish=DONE), False, chat=False)["finish_reason"] == "stop"
