"""DecodeState: one request's whole decode state, allocated once per worker and reset per request (spec 8).

Per layer: conv state (d_inner, K-1) and SSM state (d_inner, N), both fp32. Per KV-producing layer a KV buffer
(Hk, capacity, d) in the model dtype whose first num_meta slots hold the meta tokens' K/V; after them a global
layer stores every later position in order, a sliding-window layer a ring of `window` slots. Consumer layers own
nothing: they read their producer's buffer. Position -> slot arithmetic: kernels/prefill_kv.py's ring_slots, whose
prefill kernels apply the same rule on the device, as does decode's first kernel, kernels/step_inputs.py.
"""

from __future__ import annotations

import torch

from engine.config import HymbaConfig


class DecodeState:
    def __init__(self, config: HymbaConfig, max_model_len: int, device: torch.device, dtype: torch.dtype):
        L, d, K, N = config.num_hidden_layers, config.d_inner, config.mamba_d_conv, config.mamba_d_state
        Hk, M = config.num_key_value_heads, config.num_memory_tokens
        self.num_meta = M
        self.max_positions = M + max_model_len  # meta tokens + prompt + generated
        # (L, d_inner, K-1) fp32, each channel's row padded to K values: 16 bytes with K = 4, as the persistent decode
        # kernel copies them (kernels/persistent_decode.cu); every other reader takes the stride
        self.conv = torch.zeros(L, d, K, dtype=torch.float32, device=device)[..., : K - 1]
        self.ssm = torch.zeros(L, d, N, dtype=torch.float32, device=device)  # (L, d_inner, N) fp32
        # window[i]: the sliding window of layer i's KV buffer, None for a global one.
        self.window: dict[int, int | None] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for i, is_producer in enumerate(config.is_kv_producer):
            if not is_producer:
                continue
            window = None if config.is_global[i] else min(config.sliding_window, max_model_len)
            capacity = M + (window if window is not None else max_model_len)
            self.window[i] = window
            self.k[i] = torch.zeros(Hk, capacity, config.head_dim, dtype=dtype, device=device)
            self.v[i] = torch.zeros(Hk, capacity, config.v_head_dim, dtype=dtype, device=device)
        # decode's index groups: one row (window or 0 for global, capacity) per distinct buffer shape, which the step's
        # first kernel turns into (slot, filled slots) rows (kernels/step_inputs.py); group[i]: layer i's row
        shapes = list(dict.fromkeys((w, self.k[i].shape[1]) for i, w in self.window.items()))
        self.group = {i: shapes.index((w, self.k[i].shape[1])) for i, w in self.window.items()}
        rows = [(w or 0, capacity) for w, capacity in shapes]
        self.groups = torch.tensor(rows, dtype=torch.int64).view(-1, 2).to(device)
        self.num_tokens = 0  # positions processed so far, meta tokens included: the next token's position
        # the same count on the device, which a captured decode step reads and advances (the host never does there)
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)
        self._snapshot: tuple[torch.Tensor, torch.Tensor, dict, dict] | None = None

    @property
    def nbytes(self) -> int:
        tensors = [self.conv, self.ssm, *self.k.values(), *self.v.values()]
        return sum(t.untyped_storage().nbytes() for t in tensors)  # the conv state's padding included

    def save_snapshot(self) -> None:
        """Remember the state right after the meta tokens (the same for every request: spec 8, last bullet)."""
        assert self.num_tokens == self.num_meta, "snapshot is taken right after prefilling the meta tokens"
        M = self.num_meta
        self._snapshot = (
            self.conv.clone(),
            self.ssm.clone(),
            {i: k[:, :M].clone() for i, k in self.k.items()},
            {i: v[:, :M].clone() for i, v in self.v.items()},
        )

    def reset(self) -> None:
        """Start a new request from the post-meta-token snapshot. Slots past the meta tokens are not cleared:
        nothing reads a slot before this request writes it."""
        assert self._snapshot is not None, "save_snapshot() must run once at load time"
        conv, ssm, k, v = self._snapshot
        self.conv.copy_(conv)
        self.ssm.copy_(ssm)
        for i in self.k:
            self.k[i][:, : self.num_meta].copy_(k[i])
            self.v[i][:, : self.num_meta].copy_(v[i])
        self.set_num_tokens(self.num_meta)

    def clear(self) -> None:
        """Empty state (before the meta tokens), used once to build the snapshot."""
        self.conv.zero_()
        self.ssm.zero_()
        self.set_num_tokens(0)

    def set_num_tokens(self, n: int) -> None:
        """After a reset or a prefill: the host count, and its device copy (written without a sync)."""
        self.num_tokens = n
        self.pos.fill_(n)

    # --- position -> slot arithmetic ---

    def num_valid(self, layer_idx: int, num_positions: int) -> int:
        """Filled slots once positions [0, num_positions) are written."""
        return min(num_positions, self.k[layer_idx].shape[1])

    def decode_indices(self, idx: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per KV-producing layer: (slot, filled slots) for a decode step at position self.pos, as (1,) int64 views
        of idx, the (groups, 2) rows kernels/step_inputs.py computed on the device from self.groups (a CUDA graph
        captures this). Layers of one shape share them."""
        return {i: (idx[g, 0:1], idx[g, 1:2]) for i, g in self.group.items()}

    def history_range(self, layer_idx: int, start: int) -> tuple[int, int, int]:
        """The positions before `start` that a prefill chunk starting there may see, in position order, as
        (m, lo, count): positions [0, m) and [lo, start), count = m + start - lo. That is the meta tokens, then the
        last `window` positions for a sliding layer or every later position for a global one. kernels/prefill_kv.py
        gathers these keys from the buffer (slots(): they are all still there) and writes the chunk's own after."""
        M, window = self.num_meta, self.window[layer_idx]
        m = min(start, M)
        lo = start if start <= M else (M if window is None else max(M, start - window))
        return m, lo, m + start - lo
