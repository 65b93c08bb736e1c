"""Pure conversion rules of format: tgi (no network)."""

from __future__ import annotations

import json

from dstack.proxy.registry import ModelInfo
from dstack.proxy.tgi import StreamConverter, render_chat, stop_list, tgi_parameters, trim_stop


def _texts(out: bytes) -> list[str]:
    res = []
    for line in out.split(b"\n\n"):
        if line.startswith(b"data: {"):
            ch = json.loads(line[6:])["choices"]
            if ch:
                res.append(ch[0]["delta"].get("content") or "")
    return res


def test_stop_split_across_tokens_is_held_back_and_trimmed():
    conv = StreamConverter(True, "m", ["END"], False, None)
    out = b""
    for t in ["Hi ", "E", "N"]:
        piece, done = conv.event({"token": {"text": t, "special": False}})
        out += piece
        assert not done
    assert "".join(_texts(out)) == "Hi "  # "EN" could still become "END"
    piece, done = conv.event(
        {
            "token": {"text": "D!", "special": False},
            "generated_text": "Hi END!",
            "details": {"finish_reason": "stop_sequence", "generated_tokens": 4, "input_length": 7},
        }
    )
    assert done and piece.endswith(b"data: [DONE]\n\n")
    assert "".join(_texts(out + piece)) == "Hi "


def test_parameters_and_template():
    m = ModelInfo(
        "m",
        "tgi",
        chat_template="{{ bos_token }}{% for x in messages %}{{ x.content }}{% endfor %}",
        eos_token="</s>",
        bos_token="<s>",
    )
    assert (
        render_chat(m, [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
        == "<s>ab"
    )
    stops = stop_list({"stop": "x"}, m)
    assert stops == ["x", "</s>"]
    p = tgi_parameters({"max_tokens": 5, "temperature": 0, "top_p": 1.0, "seed": 3, "n": 2}, stops, stream=False)
    assert p == {"details": True, "max_new_tokens": 5, "best_of": 2, "do_sample": True, "stop": ["x", "</s>"]}
    p = tgi_parameters({"temperature": 0.7, "top_p": 0.9, "seed": 3}, [], stream=True)
    assert p == {"details": True, "temperature": 0.7, "top_p": 0.9, "do_sample": True, "seed": 3}
    assert trim_stop("abc</s>", ["</s>"]) == "abc"


def test_proxy_and_engine_render_a_template_alike():
    """One renderer: a template with the engine's extras (tojson, strftime_now) gives the same
    prompt through the proxy's OpenAI → TGI mapping and the engine's own chat endpoint."""
    import datetime

    from dstack.core.chat_template import ChatTemplate
    from dstack.serving.openai_api import chat_prompt
    from dstack.serving.schemas import ChatCompletionRequest

    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | tojson }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] year {{ strftime_now('%Y') }}{% endif %}"
    )
    m = ModelInfo(name="m", format="tgi", chat_template=template, bos_token="<s>", eos_token="</s>")
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        ],
    }
    # the proxy maps the request's JSON as it came; the engine renders what its request schema validated
    via_proxy = render_chat(m, json.loads(json.dumps(body))["messages"])
    via_engine = chat_prompt(ChatTemplate(template, "<s>", "</s>"), ChatCompletionRequest.model_validate(body))
    assert via_proxy == via_engine
    year = datetime.datetime.now().year
    assert via_proxy == f'<s>[system] "Be brief."\n[user] "Hi there"\n[assistant] year {year}'
