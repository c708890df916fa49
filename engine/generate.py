"""Engine: one loaded checkpoint on one device with one preallocated DecodeState, and the generation loop.

Engine.generate(request, should_stop) runs prefill, then decode until max_tokens, EOS, a stop id, a stop string,
the context limit or cancellation, yielding TokenEvents. Synchronous and single-request (batch size 1): the server
runs one Engine per device in its own worker thread. On CUDA each decode step is one CUDA graph replay
(engine/graph.py), and the loop queues step t+1 on the GPU before it reads token t back, so detokenizing, stop
checks and handing the event to the server happen while the GPU computes the next token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from engine import sampling
from engine.api import EngineError, FinishReason, GenerationRequest, SamplingParams, TokenEvent
from engine.config import HymbaConfig
from engine.graph import DecodeGraph, Prefill
from engine.loader import load_model
from engine.model import HymbaForCausalLM
from engine.state import DecodeState
from engine.stops import StopMatcher
from engine.tokenizer import Tokenizer
from engine.weights import CheckpointError

# generation_config.json keys that become per-request sampling defaults (vLLM's --generation-config auto),
# each with the range SamplingParams accepts
_SAMPLING_DEFAULTS = {
    "temperature": (float, lambda v: v >= 0, "a number >= 0"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (int, lambda v: v >= 0, "an int >= 0"),
    "min_p": (float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "repetition_penalty": (float, lambda v: v > 0, "a number > 0"),
}


class Engine:
    def __init__(
        self,
        model_dir: Path,
        config: HymbaConfig,
        model: HymbaForCausalLM,
        state: DecodeState,
        tokenizer: Tokenizer,
        defaults: dict[str, Any],
        eos_token_ids: tuple[int, ...],
        load_seconds: float,
        graph: DecodeGraph | None = None,
        prefill: Prefill | None = None,
    ):
        self.model_dir, self.config, self.model, self.state = model_dir, config, model, state
        self.graph = graph
        self.prefill = prefill or Prefill(model, state, cuda_graphs=False)
        # On CUDA the loop queues step t+1 before reading token t back (the launch returns at once). On the CPU a
        # step runs in the call, so the token is delivered first.
        self.is_pipelined = state.pos.is_cuda
        self._reader = _TokenReader(state.pos.device)
        self.tokenizer, self.defaults, self.eos_token_ids = tokenizer, defaults, eos_token_ids
        self.model_name = model_dir.resolve().name
        self.max_model_len = state.max_positions - config.num_memory_tokens
        self.state_nbytes = state.nbytes
        self.load_seconds = load_seconds
        self.device = str(state.ssm.device)
        # which kernels decode (logged at load): the graph's, or eager launches of the Triton kernels or the twins
        self.decode_path = graph.path if graph is not None else ("eager" if state.pos.is_cuda else "PyTorch twins")

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        device: str = "auto",
        dtype: str | None = None,
        max_model_len: int | None = None,
        cuda_graph: bool = True,
    ) -> Engine:
        """Load a Hugging Face Hymba folder. Raises ConfigError / CheckpointError / TokenizerError / ValueError,
        each with a one-line message naming the file and the field. On CUDA the decode step and short prompts'
        prefill are captured as CUDA graphs unless cuda_graph is False (then every step launches its kernels)."""
        start = time.perf_counter()
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise CheckpointError(f"{model_dir}: not a directory")
        defaults, gen_eos = _read_generation_config(model_dir / "generation_config.json")  # small files first:
        tokenizer = Tokenizer.from_dir(model_dir)  # a bad one fails before the weights are read
        config, model, state = load_model(model_dir, device, dtype, max_model_len)
        graph = DecodeGraph(model, state) if cuda_graph and state.pos.is_cuda else None
        prefill = Prefill(model, state, cuda_graphs=cuda_graph)
        sampling.warm_up(config.vocab_size, state.ssm.device)
        eos = tuple(dict.fromkeys(config.eos_token_id + gen_eos))
        seconds = time.perf_counter() - start
        return cls(model_dir, config, model, state, tokenizer, defaults, eos, seconds, graph, prefill)

    def generate(
        self,
        request: GenerationRequest,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[TokenEvent]:
        """Yield one TokenEvent per generated token; the last one carries the finish reason.

        Raises ValueError for a request the engine cannot run (empty prompt, ids outside the vocabulary, prompt
        at or past the context limit) and EngineError when generation itself fails."""
        params, prompt = request.params, request.prompt_ids
        self._check_prompt(prompt)
        if should_stop():
            yield TokenEvent(None, "", finish_reason=FinishReason.CANCELLED, num_prompt_tokens=len(prompt))
            return
        try:
            yield from self._generate(prompt, params, should_stop)
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            raise EngineError(f"out of GPU memory during generation ({e})") from None
        except EngineError:
            raise
        except Exception as e:  # anything else inside the loop is the engine's failure, never the request's
            raise EngineError(f"generation failed: {type(e).__name__}: {e}") from e

    def _check_prompt(self, prompt: tuple[int, ...]) -> None:
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        vocab = self.config.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; the context limit is {self.max_model_len}, "
                "which must leave room for at least one generated token"
            )

    def _generate(self, prompt: tuple[int, ...], params: SamplingParams, should_stop: Callable[[], bool]):
        device, n = self.state.ssm.device, len(prompt)
        if device.type == "cuda":  # this thread's current device: graph replay and events use its stream
            torch.cuda.set_device(device)
        # Everything the first token needs but the logits is made before the prefill is queued: its host-to-device
        # copies (the prompt, the stop ids, the logit bias) each wait for the stream, and behind a queued prefill
        # that wait would keep the host from queueing the first token's sampling until the prefill is done.
        ids = torch.tensor(prompt, dtype=torch.int64, device=device)
        penalties = sampling.PenaltyState(ids, self.config.vocab_size, params.logit_bias)
        generator = sampling.make_generator(params.seed, device)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        banned = None  # the stop ids, banned until min_tokens: a row, as the pick reads it
        if stop_ids and params.min_tokens > 0:
            banned = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=device)
            banned[torch.tensor(sorted(stop_ids), dtype=torch.int64, device=device)] = True
        stop_strings = params.stop
        if not params.ignore_eos and self.tokenizer.eos_token:  # spec 10: the model may spell EOS out as text
            stop_strings = (*stop_strings, self.tokenizer.eos_token)
        matcher = StopMatcher(stop_strings)
        detokenizer = self.tokenizer.detokenizer(prompt)

        logits = self.prefill(ids, all_logits=params.prompt_logprobs is not None)
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = sampling.prompt_logprobs(logits, prompt, params.prompt_logprobs)
            logits = logits[-1]

        num_generated = 0
        while True:
            is_early = num_generated < params.min_tokens
            token = sampling.sample(logits, params, penalties, generator, banned if is_early else None)
            self._reader.start(token)
            num_generated += 1
            # a graph's logits buffer is overwritten by the next step, queued below before this token is scored
            scored = logits.clone() if params.logprobs is not None and self.graph is not None else logits
            has_next = num_generated < params.max_tokens and n + num_generated < self.max_model_len
            failure = None
            if has_next and self.is_pipelined:
                # Queue the next step before reading this token: if it turns out to end the request, one step was
                # computed for nothing; a -1 (INVALID_TOKEN_ID) is clamped on the device and raised below. If the
                # step fails, this token is still delivered first: the failure belongs to the next one.
                try:
                    logits = self._step(token, penalties)
                except Exception as e:
                    failure = e
            token_id = self._reader.result()
            if token_id == sampling.INVALID_TOKEN_ID:
                if self._persistent_failed():
                    raise EngineError(
                        "the persistent decode kernel could not run all its blocks at once (is another process using "
                        f"this GPU?); this worker decodes on the per-layer path from now on ({self.decode_path})"
                    )
                raise EngineError(f"the model produced non-finite logits at generated token {num_generated - 1}")
            logprob = sampling.token_logprob(scored, token_id, params.logprobs) if params.logprobs is not None else None

            finish = None
            if token_id in stop_ids and not is_early:  # the stop token's own text is not part of the output
                text, is_stopped = _drain(matcher, detokenizer)
                finish = FinishReason.STOP
            else:
                text, is_stopped = matcher.push(detokenizer.push(token_id))
                if is_stopped:
                    finish = FinishReason.STOP
                elif num_generated >= params.max_tokens or n + num_generated >= self.max_model_len:
                    tail, is_stopped = _drain(matcher, detokenizer)
                    text += tail
                    finish = FinishReason.STOP if is_stopped else FinishReason.LENGTH
            yield TokenEvent(
                token_id, text, logprob, finish, n, num_generated, prompt_logprobs if num_generated == 1 else None
            )
            if finish is not None:
                return
            if failure is not None:
                raise failure
            if should_stop():
                yield TokenEvent(
                    None,
                    "",
                    finish_reason=FinishReason.CANCELLED,
                    num_prompt_tokens=n,
                    num_completion_tokens=num_generated,
                )
                return
            if has_next and not self.is_pipelined:
                logits = self._step(token, penalties)

    def _persistent_failed(self) -> bool:
        """After a step that gave no token: whether the persistent kernel's waits gave up (it then poisons its output,
        kernels/persistent_decode.cu). If so, decode through a new graph without it from now on."""
        fast = self.model.persistent
        if self.graph is None or fast is None or fast.state is not self.state or not fast.kernel.err.item():
            return False
        self.graph = DecodeGraph(self.model, self.state, persistent=False)
        self.decode_path = self.graph.path
        return True

    def _step(self, token: torch.Tensor, penalties: sampling.PenaltyState) -> torch.Tensor:
        penalties.update(token.clamp_min(0))
        return (self.graph or self.model).decode(token, self.state)


class _TokenReader:
    """Reads a sampled token id back to the host without waiting for GPU work queued after it: a non-blocking copy
    into pinned memory, then a wait on an event recorded right behind that copy (int(token) would wait for the
    whole stream, including the next step)."""

    def __init__(self, device: torch.device):
        self.is_cuda = device.type == "cuda"
        if self.is_cuda:
            self.device = device
            self.host = torch.empty(1, dtype=torch.int64, pin_memory=True)
            self.event = torch.cuda.Event()
        self.value = 0

    def start(self, token: torch.Tensor) -> None:
        if self.is_cuda:
            self.host.copy_(token.view(1), non_blocking=True)
            self.event.record(torch.cuda.current_stream(self.device))
        else:
            self.value = int(token)

    def result(self) -> int:
        if self.is_cuda:
            self.event.synchronize()
            return int(self.host[0])
        return self.value


def _drain(matcher: StopMatcher, detokenizer) -> tuple[str, bool]:
    """At the end of generation: release held-back text, still honouring a stop string it completes."""
    text, is_stopped = matcher.push(detokenizer.flush())
    return (text, True) if is_stopped else (text + matcher.flush(), False)


def _read_generation_config(path: Path) -> tuple[dict[str, Any], tuple[int, ...]]:
    """Sampling defaults and extra EOS ids from generation_config.json (optional file)."""
    if not path.exists():
        return {}, ()
    try:
        raw = json.loads(path.read_text())
        assert isinstance(raw, dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AssertionError):
        raise CheckpointError(f"{path.name}: not a JSON object") from None
    defaults = {}
    for key, (kind, is_valid, expected) in _SAMPLING_DEFAULTS.items():
        if key in raw:
            value = raw[key]
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not is_number or (kind is int and value != int(value)) or not is_valid(value):
                raise CheckpointError(f"{path.name}: {key} must be {expected}, got {value!r}")
            defaults[key] = kind(value)
    eos = raw.get("eos_token_id", [])
    eos = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if not isinstance(eos, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
        raise CheckpointError(f"{path.name}: eos_token_id must be an int or a list of ints, got {eos!r}")
    return defaults, tuple(eos)
