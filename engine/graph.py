"""CUDA graphs of the model: DecodeGraph (issue 5) and Prefill (issue 4), each captured once per worker at load.

DecodeGraph: the model's whole decode step captured once as a CUDA graph, replayed for every token.

An eager step launches about 330 kernels; on a host that spends 10-25 µs per launch that is the cost of the token,
not the GPU work (about 1 ms). Captured once per worker, a step is a single graph launch. The graph reads its
inputs from fixed device buffers: the token id (written by the sampler's output, on the device) and the position
(state.pos, which the step itself advances); everything per-position (RoPE row, ring slot, filled-slot counts) is
computed from them on the device (engine/model.py decode_step, engine/state.py decode_indices). The logits come
back in one fixed buffer, overwritten by the next replay.

Same kernels, same order as the eager step, so a graph replay gives bit-identical logits (tests/engine/
test_graph.py checks whole generations against the eager path on the GPU).

Prefill: a request's reset and prompt as served. A prefill chunk is about 2,000 kernels; eagerly its time is the
host's launches (40 ms at 128 tokens, GPU work about 3 ms). On CUDA, prompts up to PREFILL_GRAPH_MAX_TOKENS (and
no longer than any sliding window) are padded to the next of a few lengths and replayed from that length's graph
(HymbaForCausalLM.prefill_padded says why padding is exact); longer prompts and prompt logprobs run eagerly.
"""

from __future__ import annotations

import torch

from engine.model import DEFAULT_PREFILL_CHUNK, HymbaForCausalLM
from engine.state import DecodeState

# Padded lengths of the prefill graphs: padding costs at most a third past 256 tokens (a short prompt's GPU time is
# mostly fixed per kernel, so powers of two suffice below). Their activations share one memory pool.
PREFILL_GRAPH_LENGTHS = (16, 32, 64, 128, 256, 384, 512, 768, 1024)
PREFILL_GRAPH_MAX_TOKENS = PREFILL_GRAPH_LENGTHS[-1]


class DecodeGraph:
    def __init__(self, model: HymbaForCausalLM, state: DecodeState, warmup_steps: int = 2):
        """Compile the kernels (warm-up steps on a side stream), then capture. Leaves the state reset."""
        device = state.pos.device
        assert device.type == "cuda", "CUDA graphs need a CUDA device"
        self.model, self.state = model, state
        torch.cuda.set_device(device)  # Triton launches into the current device's context (engine/loader.py)
        self.token = torch.zeros(1, dtype=torch.int64, device=device)  # the graph's input
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            state.reset()
            for _ in range(warmup_steps):  # Triton compiles here, outside the capture
                model.decode_step(self.token, state)
        torch.cuda.current_stream(device).wait_stream(side)
        state.reset()
        self.graph = torch.cuda.CUDAGraph()
        # The capture stream is named: torch.cuda.graph's default is one stream per process, made on the device
        # current at the first capture, and entering it would make that device current for a second GPU's capture.
        with torch.cuda.graph(self.graph, stream=side):
            self.logits = model.decode_step(self.token, state)  # (V,) fp32, the graph's output
        state.reset()
        torch.cuda.synchronize(device)

    def decode(self, token: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """model.decode's contract, by replay: token (0-d or (1,) int64 on the device) at state.num_tokens.

        Returns the graph's logits buffer: read (or copy) it before the next call overwrites it. Nothing here
        waits for the GPU."""
        assert state is self.state, "a graph replays on the state it was captured with"
        if state.num_tokens >= state.max_positions:
            raise ValueError(f"position {state.num_tokens} is past the context limit ({state.max_positions} positions)")
        self.token.copy_(token.view(1))
        self.graph.replay()
        state.num_tokens += 1
        return self.logits


class Prefill:
    """The served prefill: state.reset() and the prompt, returning the last token's logits (or every token's)."""

    def __init__(self, model: HymbaForCausalLM, state: DecodeState, cuda_graphs: bool = True):
        """On CUDA, prompts up to the largest padded length that fits this model (no longer than any sliding window,
        one prefill chunk or the context limit) are padded; with cuda_graphs each padded length is captured once.
        Without graphs the same padded kernels run eagerly, so both give bit-identical logits."""
        self.model, self.state = model, state
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # padded length -> (graph, logits)
        self.lengths: list[int] = []
        if not state.pos.is_cuda:  # a CPU step's time is its arithmetic: padding would only add to it
            return
        windows = [w for w in state.window.values() if w is not None]
        limit = min([PREFILL_GRAPH_MAX_TOKENS, DEFAULT_PREFILL_CHUNK, state.max_positions - state.num_meta, *windows])
        if limit >= PREFILL_GRAPH_LENGTHS[0]:
            self.lengths = [n for n in PREFILL_GRAPH_LENGTHS if n < limit] + [limit]
        device = state.pos.device
        self.ids = torch.zeros(max(self.lengths, default=0), dtype=torch.int64, device=device)  # the graphs' inputs
        self.valid = torch.ones((), dtype=torch.int64, device=device)
        if not (cuda_graphs and self.lengths):
            return
        torch.cuda.set_device(device)
        side, pool = torch.cuda.Stream(device), torch.cuda.graph_pool_handle()
        side.wait_stream(torch.cuda.current_stream(device))
        for n in reversed(self.lengths):  # the largest first: the pool grows once, the others reuse it
            with torch.cuda.stream(side):  # warm-up: Triton compiles and cuBLAS picks its kernels outside capture
                state.reset()
                model.prefill_padded(self.ids[:n], self.valid, state)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=side):  # the stream named as in DecodeGraph
                state.reset()
                logits = model.prefill_padded(self.ids[:n], self.valid, state)
            self.graphs[n] = (graph, logits)
        torch.cuda.current_stream(device).wait_stream(side)
        state.reset()
        torch.cuda.synchronize(device)

    def __call__(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """ids: (n,) int64 on the state's device. Returns (V,) fp32 logits, or (n, V) with all_logits. A graph's
        logits buffer is overwritten by that graph's next replay, so read it before the next request."""
        n = ids.numel()
        padded = None if all_logits else next((m for m in self.lengths if m >= n), None)
        if padded is None:
            self.state.reset()
            return self.model.prefill(ids, self.state, all_logits=all_logits)
        self.ids[:n].copy_(ids)
        self.valid.fill_(n)
        if padded in self.graphs:
            graph, logits = self.graphs[padded]
            graph.replay()
        else:
            self.state.reset()
            logits = self.model.prefill_padded(self.ids[:padded], self.valid, self.state)
        self.state.set_num_tokens(self.state.num_meta + n)
        return logits
