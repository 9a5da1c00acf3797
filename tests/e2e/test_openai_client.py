"""Kiln's /v1 API through the official `openai` Python SDK."""

import math

import openai
import pytest

CHAT_MODEL = "smollm2-135m"
EMBEDDING_MODEL = "all-minilm-l6-v2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_model_list(client):
    ids = {m.id for m in client.models.list().data}
    assert CHAT_MODEL in ids
    assert EMBEDDING_MODEL in ids


def test_chat(client):
    r = client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=16, temperature=0)
    assert r.object == "chat.completion"
    assert r.model == CHAT_MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_reports_usage(client):
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text = []
    finish = None
    usage = None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        for choice in chunk.choices:
            if choice.delta.content:
                text.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert "".join(text).strip()
    assert finish in ("stop", "length")
    assert usage is not None, "stream_options.include_usage must add a usage chunk"
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 16


def test_embeddings(client):
    # The SDK asks for base64 by default and decodes it.
    r = client.embeddings.create(
        model=EMBEDDING_MODEL,
        input=["A kiln fires pottery.", "Kilns are ovens for ceramics.", "The stock market fell."],
    )
    assert [d.index for d in r.data] == [0, 1, 2]
    vectors = [d.embedding for d in r.data]
    for v in vectors:
        assert len(v) == 384
        assert abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-3

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])
    assert r.usage.prompt_tokens > 0


def test_embeddings_as_floats(client):
    r = client.embeddings.create(model=EMBEDDING_MODEL, input="hello", encoding_format="float")
    assert len(r.data[0].embedding) == 384


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=4)


def test_zero_max_tokens_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=0)
