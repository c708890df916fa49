"""DecodeGraph: the model's whole decode step captured once as a CUDA graph, replayed for every token (issue 5).

An eager step launches about 330 kernels; on a host that spends 10-25 µs per launch that is the cost of the token,
not the GPU work (about 1 ms). Captured once per worker, a step is a single graph launch. The graph reads its
inputs from fixed device buffers: the token id (written by the sampler's output, on the device) and the position
(state.pos, which the step itself advances); everything per-position (RoPE row, ring slot, filled-slot counts) is
computed from them on the device (engine/model.py decode_step, engine/state.py decode_indices). The logits come
back in one fixed buffer, overwritten by the next replay.

Same kernels, same order as the eager step, so a graph replay gives bit-identical logits (tests/engine/
test_graph.py checks whole generations against the eager path on the GPU).
"""

from __future__ import annotations

import torch

from engine.model import HymbaForCausalLM
from engine.state import DecodeState


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
