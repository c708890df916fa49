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

Prefill: a request's reset and prompt as served. A prefill chunk is about 1,000 kernels; eagerly its time is the
host's launches (40 ms at 128 tokens, GPU work about 3 ms; 50 ms against 30 ms for a 2048-token chunk). On CUDA the
prompt runs in chunks of DEFAULT_PREFILL_CHUNK tokens, each replayed from a graph captured for its start and length:
every chunk but the last is full; the last is padded to the next of a few lengths (HymbaForCausalLM.prefill_padded
says why padding is exact). Chunks past PREFILL_GRAPH_CHUNKS, and prompt logprobs, run eagerly.
"""

from __future__ import annotations

import torch

from engine.model import DEFAULT_PREFILL_CHUNK, HymbaForCausalLM
from engine.state import DecodeState

# Padded lengths of a prompt's last chunk: the first chunk's (a short prompt's GPU time is mostly fixed per kernel, so
# powers of two suffice below 256; padding costs at most a third past it), and a later chunk's (a few steps: its
# padding costs at most 512 rows against the 2048 of the chunks before it). All graphs share one memory pool.
PREFILL_GRAPH_LENGTHS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048)
LATER_CHUNK_LENGTHS = (512, 1024, 1536, 2048)
PREFILL_GRAPH_CHUNKS = 8  # chunks with graphs: 16k prompt tokens; each costs its capture at load


class DecodeGraph:
    def __init__(self, model: HymbaForCausalLM, state: DecodeState, warmup_steps: int = 2, persistent: bool = True):
        """Compile the kernels (warm-up steps on a side stream), then capture. Leaves the state reset. persistent:
        run the layers through the persistent kernel where it fits (model.use_persistent); `path` says
        which decode path the graph holds."""
        device = state.pos.device
        assert device.type == "cuda", "CUDA graphs need a CUDA device"
        self.model, self.state = model, state
        torch.cuda.set_device(device)  # Triton launches into the current device's context (engine/loader.py)
        model.persistent = None
        reason = model.use_persistent(state) if persistent else "switched off"
        self.persistent = model.persistent  # the graph's launches point into its buffers: keep them alive
        if reason is None:
            runs = model.persistent.segments
            rest = "" if runs[0][0] == 0 else ", Triton for the rest"
            self.path = f"persistent kernel for layers {', '.join(f'{a}-{b - 1}' for a, b in runs)}{rest}"
        else:
            self.path = f"Triton ({reason})"
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

    def __init__(
        self, model: HymbaForCausalLM, state: DecodeState, cuda_graphs: bool = True, chunk: int = DEFAULT_PREFILL_CHUNK
    ):
        """On CUDA the prompt's chunks are padded (module docstring); with cuda_graphs each chunk's lengths are
        captured once. Without graphs the same padded kernels run eagerly, so both give bit-identical logits."""
        self.model, self.state, self.chunk = model, state, chunk
        self.lengths: list[list[int]] = []  # per chunk of a prompt: its padded lengths, ascending
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (chunk, length) ->
        if not state.pos.is_cuda:  # a CPU step's time is its arithmetic: padding would only add to it
            return
        for c in range(PREFILL_GRAPH_CHUNKS):
            room = min(self.chunk, state.max_positions - self.start(c))  # the RoPE tables end at the context limit
            if room < 1:
                break
            self.lengths.append([n for n in (LATER_CHUNK_LENGTHS if c else PREFILL_GRAPH_LENGTHS) if n < room] + [room])
        device = state.pos.device
        self.ids = torch.zeros(self.chunk, dtype=torch.int64, device=device)  # the graphs' inputs
        self.valid = torch.ones((), dtype=torch.int64, device=device)
        if not (cuda_graphs and self.lengths):
            return
        torch.cuda.set_device(device)
        side, pool = torch.cuda.Stream(device), torch.cuda.graph_pool_handle()
        side.wait_stream(torch.cuda.current_stream(device))
        # the largest first: the pool grows once, the others reuse it
        for n, c in sorted(((n, c) for c, lengths in enumerate(self.lengths) for n in lengths), reverse=True):
            with torch.cuda.stream(side):  # warm-up: Triton compiles and cuBLAS picks its kernels outside capture
                self._chunk(c, n)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=side):  # the stream named as in DecodeGraph
                logits = self._chunk(c, n)
            self.graphs[c, n] = (graph, logits)
        torch.cuda.current_stream(device).wait_stream(side)
        state.reset()
        torch.cuda.synchronize(device)

    def start(self, c: int) -> int:
        """The first position of a prompt's chunk c."""
        return self.state.num_meta + c * self.chunk

    def _chunk(self, c: int, n: int) -> torch.Tensor:
        """Chunk c padded to n rows, eagerly (what a graph captures): the first chunk starts with the reset."""
        if c == 0:
            self.state.reset()
        self.state.num_tokens = self.start(c)  # the host's count, read by prefill_padded (state.pos is set at the end)
        return self.model.prefill_padded(self.ids[:n], self.valid, self.state)

    def __call__(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """ids: (n,) int64 on the state's device. Returns (V,) fp32 logits, or (n, V) with all_logits. A graph's
        logits buffer is overwritten by that graph's next replay, so read it before the next request."""
        n, state = ids.numel(), self.state
        if all_logits or not self.lengths:
            state.reset()
            return self.model.prefill(ids, state, all_logits=all_logits)
        logits = None
        for c in range((n + self.chunk - 1) // self.chunk):
            first, take = c * self.chunk, min(self.chunk, n - c * self.chunk)
            padded = next((m for m in self.lengths[c] if m >= take), None) if c < len(self.lengths) else None
            if padded is None:  # past the chunks with graphs (or the context: model.prefill says so)
                if c == 0:
                    state.reset()
                state.set_num_tokens(self.start(c))
                return self.model.prefill(ids[first:], state)
            self.ids[:take].copy_(ids[first : first + take])  # stream-ordered after the previous chunk's replay
            self.valid.fill_(take)
            if (c, padded) in self.graphs:
                graph, logits = self.graphs[c, padded]
                graph.replay()
            else:
                logits = self._chunk(c, padded)
        state.set_num_tokens(state.num_meta + n)
        return logits
