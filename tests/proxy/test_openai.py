"""The OpenAI-compatible endpoint with the real `openai` SDK: passthrough and TGI conversion."""

from __future__ import annotations

import httpx
import openai
import pytest

from dstack.proxy import ModelInfo, Replica, ServiceInfo

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
STRICT = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}{{ bos_token }}x"


@pytest.fixture(scope="module")
def models(harness, upstreams):
    h = harness
    for run, model in [
        ("oai", ModelInfo(name="oai-model", format="openai")),
        ("oaibroken", ModelInfo(name="broken", format="openai")),
        ("tgi", ModelInfo(name="tgi-model", format="tgi", chat_template=CHATML, eos_token="</s>")),
        ("tginotmpl", ModelInfo(name="tgi-no-template", format="tgi")),
        ("tgistrict", ModelInfo(name="tgi-strict", format="tgi", chat_template=STRICT, bos_token="<s>")),
    ]:
        h.call(h.registry.upsert_service, ServiceInfo(project="main", run_name=run, model=model))
        h.call(h.registry.set_replicas, "main", run, [Replica("a", upstreams["a"].url)])
    return openai.OpenAI(base_url=f"{h.url}/proxy/models/main/v1", api_key="good", max_retries=0)


def test_models_list(models, harness):
    ids = {m.id for m in models.models.list()}
    assert {"oai-model", "tgi-model"} <= ids
    r = httpx.get(f"{harness.url}/proxy/models/main/v1/models")
    assert r.status_code == 401
    r = httpx.get(f"{harness.url}/proxy/models/main/v1/models", headers={"Authorization": "Bearer bad"})
    assert r.status_code == 403


def test_openai_passthrough(models):
    r = models.chat.completions.create(model="oai-model", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "openai-echo a" and r.usage.total_tokens == 5
    stream = models.chat.completions.create(
        model="oai-model",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "openai-echo a"
    assert chunks[-1].usage.total_tokens == 6
    c = models.completions.create(model="oai-model", prompt="hi")
    assert c.choices[0].text == "openai-echo a"
    with pytest.raises(openai.InternalServerError) as e:
        models.chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}])
    assert "upstream exploded" in str(e.value)


def test_unknown_model_and_auth(models, harness):
    with pytest.raises(openai.NotFoundError) as e:
        models.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    bad = openai.OpenAI(base_url=f"{harness.url}/proxy/models/main/v1", api_key="bad", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        bad.chat.completions.create(model="tgi-model", messages=[{"role": "user", "content": "hi"}])


def test_tgi_chat(models):
    r = models.chat.completions.create(model="tgi-model", messages=[{"role": "user", "content": "hi"}], max_tokens=100)
    assert r.choices[0].message.content == "Hello from the test model. The answer is 42. END tail"
    assert r.choices[0].finish_reason == "stop"  # eos_token
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    r = models.chat.completions.create(model="tgi-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == "Hello from the "
    r = models.chat.completions.create(model="tgi-model", messages=[{"role": "user", "content": "hi"}], stop=["42."])
    assert (
        r.choices[0].finish_reason == "stop"
        and r.choices[0].message.content == "Hello from the test model. The answer is "
    )


def test_tgi_chat_stream(models):
    stream = models.chat.completions.create(
        model="tgi-model",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stop=["END"],
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the test model. The answer is 42. "
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "stop" and all(f is None for f in finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_tgi_completions(models):
    c = models.completions.create(model="tgi-model", prompt="say", max_tokens=2)
    assert c.choices[0].text == "Hello from " and c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 2
    s = list(models.completions.create(model="tgi-model", prompt="say", max_tokens=100, stream=True))
    assert "".join(x.choices[0].text for x in s if x.choices).endswith("END tail")
    assert s[-1].choices[0].finish_reason == "stop"


def test_tgi_errors(models):
    with pytest.raises(openai.BadRequestError) as e:
        models.chat.completions.create(model="tgi-no-template", messages=[{"role": "user", "content": "hi"}])
    assert "model.chat_template" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        models.chat.completions.create(model="tgi-strict", messages=[{"role": "assistant", "content": "hi"}])
    assert "first message must be from the user" in str(e.value)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        models.chat.completions.create(model="tgi-model", messages=[{"role": "user", "content": "FAIL"}])
    assert "refuses FAIL" in str(e.value)
    with pytest.raises(openai.APIError) as e:
        list(
            models.chat.completions.create(
                model="tgi-model", messages=[{"role": "user", "content": "BREAK"}], stream=True
            )
        )
    assert "broke" in str(e.value)


def test_gateway_host_model_endpoint(models, harness):
    r = httpx.post(
        f"{harness.url}/v1/chat/completions",
        headers={"Host": "gateway.example.test", "Authorization": "Bearer good"},
        json={"model": "tgi-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello "
