"""Greedy `/v1/completions` over HTTP equals llama.cpp's continuation.

The fixtures (tests/fixtures/generation/, written by
scripts/make_generation_fixtures.py) hold, per prompt, the text llama.cpp
generates greedily when it evaluates one token per llama_decode, cut at the
first end-of-generation token as a server would, with its token count and
finish reason. The engine-level test (crates/kiln-engine/tests/
generation_llamacpp.rs) compares logits step by step; this one checks what a
client receives: the same text through the whole HTTP path (request parsing,
special-token parsing of the raw prompt, detokenisation, finish reason,
usage).
"""

import json
import pathlib

import pytest

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "generation"
MODELS = ["smollm2-135m", "gemma3-270m"]


def _cases():
    for model in MODELS:
        fixture = json.loads((FIXTURES / f"{model}.json").read_text())
        for prompt in fixture["prompts"]:
            yield pytest.param(model, prompt, id=f"{model}-{prompt['name']}")


@pytest.mark.parametrize("model,prompt", list(_cases()))
def test_greedy_completion_matches_llamacpp(client, model, prompt):
    expected = prompt["token_by_token_completion"]
    r = client.completions.create(
        model=model,
        prompt=prompt["text"],
        max_tokens=64,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.text == expected["text"]
    assert choice.finish_reason == expected["finish_reason"]
    assert r.usage.completion_tokens == expected["completion_tokens"]
    assert r.usage.prompt_tokens == prompt["n_prompt_tokens"]


@pytest.mark.parametrize("model", MODELS)
def test_concurrent_greedy_completions_match_llamacpp(client, model):
    """All of a model's prompts at once: the scheduler batches them together
    (prefill chunks mixed with decode steps), and every client still gets
    exactly the text it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = json.loads((FIXTURES / f"{model}.json").read_text())["prompts"]

    def ask(prompt):
        return client.completions.create(
            model=model, prompt=prompt["text"], max_tokens=64, temperature=0
        )

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    for prompt, r in zip(prompts, answers):
        expected = prompt["token_by_token_completion"]
        assert r.choices[0].text == expected["text"], prompt["name"]
        assert r.choices[0].finish_reason == expected["finish_reason"], prompt["name"]
        assert r.usage.completion_tokens == expected["completion_tokens"], prompt["name"]
