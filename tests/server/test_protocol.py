"""to_sampling_params: the one place precedence is decided (request -> generation_config -> OpenAI default)."""

from __future__ import annotations

import pytest

from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest

USER = [{"role": "user", "content": "hi"}]


def completion(**fields) -> CompletionRequest:
    return CompletionRequest(prompt="hi", **fields)


def test_openai_defaults_when_nothing_else_says():
    params = completion().to_sampling_params({}, num_prompt_tokens=3, max_model_len=100)
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (16, 1.0, 1.0, 0)
    assert params.logprobs is None and params.prompt_logprobs is None and params.stop == ()


def test_generation_config_beats_openai_defaults_and_the_request_beats_both():
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.2}
    params = completion().to_sampling_params(defaults, 3, 100)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.6, 0.9, 40, 1.2)
    params = completion(temperature=0, top_k=-1).to_sampling_params(defaults, 3, 100)
    assert (params.temperature, params.top_k, params.top_p) == (0, 0, 0.9)


def test_chat_max_tokens_defaults_to_the_rest_of_the_context():
    req = ChatCompletionRequest(messages=USER)
    assert req.to_sampling_params({}, num_prompt_tokens=30, max_model_len=100).max_tokens == 70
    both = ChatCompletionRequest(messages=USER, max_tokens=5, max_completion_tokens=7)
    assert both.to_sampling_params({}, 30, 100).max_tokens == 7


def test_context_limit():
    assert completion(max_tokens=70).to_sampling_params({}, 30, 100).max_tokens == 70
    with pytest.raises(APIError) as e:
        completion(max_tokens=71).to_sampling_params({}, 30, 100)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"
    assert "100 tokens" in e.value.message and "30 in the prompt" in e.value.message and "71" in e.value.message
    with pytest.raises(APIError):
        ChatCompletionRequest(messages=USER).to_sampling_params({}, 100, 100)


def test_logprobs_mapping():
    assert completion(logprobs=3).to_sampling_params({}, 3, 100).prompt_logprobs is None
    echoed = completion(logprobs=3, echo=True).to_sampling_params({}, 3, 100)
    assert (echoed.logprobs, echoed.prompt_logprobs) == (3, 3)
    chat = ChatCompletionRequest(messages=USER, logprobs=True).to_sampling_params({}, 3, 100)
    assert chat.logprobs == 0
    chat = ChatCompletionRequest(messages=USER, logprobs=True, top_logprobs=4).to_sampling_params({}, 3, 100)
    assert chat.logprobs == 4
    assert ChatCompletionRequest(messages=USER).to_sampling_params({}, 3, 100).logprobs is None


def test_stop_and_bias_normalised():
    params = completion(stop="x", logit_bias={"5": -100}, stop_token_ids=[9]).to_sampling_params({}, 3, 100)
    assert params.stop == ("x",) and params.logit_bias == {5: -100.0} and params.stop_token_ids == (9,)
    assert completion(stop=["a", ""]).to_sampling_params({}, 3, 100).stop == ("a",)


def test_unknown_fields_are_ignored():
    assert completion(frobnicate=True).to_sampling_params({}, 3, 100).max_tokens == 16
