"""Tool calling and constrained JSON through the official `openai` SDK, on
SmolLM2 (a 135M model whose template knows nothing of tools): at
temperature 1, over many seeds, the output always parses and validates
against the schema (checked with the `jsonschema` package), and a call cut
short says `length`."""

import json

import jsonschema
import openai
import pytest

MODEL = "smollm2-135m"
SEEDS = range(10)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "role": {"enum": ["doctor", "nurse", "engineer"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "zip": {"type": ["string", "null"]}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "on_call": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "skills", "address", "on_call"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
CLOCK = {"type": "function", "function": {"name": "current_time", "description": "The time now", "parameters": {"type": "object", "properties": {}}}}


def ask(client, **kw):
    kw.setdefault("model", MODEL)
    kw.setdefault("temperature", 1.0)
    return client.chat.completions.create(**kw)


def test_json_schema_output_always_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    finished = 0
    for seed in SEEDS:
        r = ask(client, messages=[{"role": "user", "content": "Describe a hospital employee as JSON."}],
                response_format=fmt, seed=seed, max_tokens=200)
        choice = r.choices[0]
        if choice.finish_reason == "length":
            with pytest.raises(ValueError):
                json.loads(choice.message.content)
            continue
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        finished += 1
    assert finished >= len(SEEDS) // 2, f"only {finished} of {len(SEEDS)} outputs finished in 200 tokens"


def test_json_object_and_a_cut_short_output(client):
    r = ask(client, messages=[{"role": "user", "content": "Give me a JSON object about cats."}],
            response_format={"type": "json_object"}, seed=3, max_tokens=300)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    short = ask(client, messages=[{"role": "user", "content": "A person as JSON."}],
                response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
                seed=1, max_tokens=4)
    assert short.choices[0].finish_reason == "length"
    assert short.choices[0].message.content.startswith("{")


def check_call(call):
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        jsonschema.validate(args, WEATHER["function"]["parameters"])
    else:
        assert call.function.name == "current_time" and isinstance(args, dict)


def test_required_tool_call_is_valid_for_every_seed(client):
    # One call per reply: every seed finishes with a call.
    for seed in SEEDS:
        r = ask(client, messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
                tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False,
                seed=seed, max_tokens=120)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        check_call(call)
    # Parallel calls: SmolLM2 tends to repeat the call until `max_tokens`;
    # every call before the one the limit cut is whole and valid.
    for seed in range(3):
        r = ask(client, messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
                tools=[WEATHER, CLOCK], tool_choice="required", seed=seed, max_tokens=120)
        choice = r.choices[0]
        calls = choice.message.tool_calls or []
        assert calls, choice
        whole = calls[:-1] if choice.finish_reason == "length" else calls
        assert choice.finish_reason in ("tool_calls", "length")
        for call in whole:
            check_call(call)


def test_named_tool_choice_and_a_round_trip(client):
    messages = [{"role": "user", "content": "Weather in Paris, in celsius?"}]
    r = ask(client, messages=messages, tools=[WEATHER, CLOCK], seed=5, max_tokens=120,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # The call and its result go back; the model answers in prose.
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 18, "sky": "clear"})},
    ]
    final = ask(client, messages=messages, tools=[WEATHER, CLOCK], tool_choice="none", temperature=0, max_tokens=40)
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content.strip()
    # `none` keeps the tools out of the prompt, but the call and its result are in it.
    alone = ask(client, messages=messages[:1], temperature=0, max_tokens=1)
    assert final.usage.prompt_tokens > alone.usage.prompt_tokens + 20


def test_streamed_tool_calls_match_the_whole_response(client):
    kw = dict(messages=[{"role": "user", "content": "What time is it, and the weather in Rome?"}],
              tools=[WEATHER, CLOCK], tool_choice="required", seed=11, max_tokens=150, temperature=0)
    whole = ask(client, **kw).choices[0]
    calls, pieces, content, finish = {}, {}, "", None
    for chunk in ask(client, stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            if not slot["name"]:
                assert tc.id and tc.type == "function" and tc.function.name, "the first delta names the call"
            slot["name"] += tc.function.name or ""
            slot["arguments"] += tc.function.arguments or ""
            pieces[tc.index] = pieces.get(tc.index, 0) + 1
        finish = chunk.choices[0].finish_reason or finish
    assert finish == whole.finish_reason
    expected = [{"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls or []]
    assert [calls[i] for i in sorted(calls)] == expected
    assert max(pieces.values()) > 3, "arguments stream in pieces, not whole"
    assert content == (whole.message.content or "")


def test_auto_lets_the_model_answer_or_call(client):
    for seed in range(4):
        r = ask(client, messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
                tools=[WEATHER], seed=seed, max_tokens=120)
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        else:
            assert choice.finish_reason in ("stop", "length")
            assert "<tool_call>" not in (choice.message.content or "") or choice.finish_reason == "length"


@pytest.mark.parametrize("extra,needle", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "bad name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                  "schema": {"type": "string", "pattern": "^a$"}}}}, "pattern"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {}}, "required": ["b"]}}}}, "required"),
    ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "cannot be combined"),
])
def test_bad_tool_and_format_requests_get_clear_errors(client, extra, needle):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, messages=[{"role": "user", "content": "hi"}], max_tokens=8, **extra)
    assert needle in e.value.message
