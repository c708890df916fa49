"""The Hymba model (spec sections 5-7) as plain modules named like the checkpoint, run over a DecodeState.

Two entry points, both writing into the state in place:
  prefill(ids, state): prompt tokens, chunk by chunk, with the prefill window rule (spec 7.1);
  decode(token, state): one generated token, with the decode window rule (spec 7.2); its device half,
  decode_step, is what engine/graph.py captures as one CUDA graph.
The heavy ops come from kernels/ (Triton on CUDA, PyTorch twins elsewhere). Prefill runs matrix-matrix products;
decode runs batch-1 matrix-vector kernels with the norms, activations and residual adds fused in.

Precision: weights, the KV cache and the operands of every matrix product are in the serving dtype (bf16 on CUDA);
activations between ops and the residual stream stay fp32. At batch 1 this costs no bandwidth, and it keeps a bf16
engine within the conformance limits, which rounding every activation to bf16 as the reference does misses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.config import HymbaConfig
from engine.state import DecodeState
from kernels.gemv import linear

DEFAULT_PREFILL_CHUNK = 2048  # bounds prefill activations and attention scores, whatever the prompt length


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Computed in fp32; written in `dtype`: a matrix product's operand dtype saves it a cast (one rounding
        either way)."""
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        return kernels.rms_norm(x, self.weight, self.eps, out=out)


def rope_tables(config: HymbaConfig, num_positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (num_positions, dq) fp32, built from a double base as the reference does (spec 5)."""
    dq = config.head_dim
    if not config.rope:
        return torch.ones(num_positions, dq, device=device), torch.zeros(num_positions, dq, device=device)
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, dq, 2, dtype=torch.int64).float() / dq))  # (dq/2,) fp32
    angles = torch.outer(torch.arange(num_positions, dtype=torch.int64).float(), inv_freq)  # (P, dq/2) fp32
    emb = torch.cat([angles, angles], dim=-1)  # (P, dq)
    return emb.cos().to(device), emb.sin().to(device)


def _positions(stash: dict, m: int, lo: int, hi: int, device) -> torch.Tensor:
    """Positions [0, m) then [lo, hi) as an int64 device tensor, made once per prefill call (built on the device: a
    CUDA graph cannot capture a copy from the host)."""
    key = ("positions", m, lo, hi)
    if key not in stash:
        recent = torch.arange(lo, hi, device=device)
        stash[key] = torch.cat([torch.arange(m, device=device), recent]) if m else recent
    return stash[key]


class HybridMixer(nn.Module):
    """`mamba.*` in the checkpoint: in_proj -> attention heads | SSM heads -> normalize, average -> out_proj."""

    def __init__(self, c: HymbaConfig, layer_idx: int):
        super().__init__()
        I, N, R = c.d_inner, c.mamba_d_state, c.dt_rank
        self.layer_idx, self.producer = layer_idx, c.kv_producer[layer_idx]
        self.is_producer = self.producer == layer_idx
        self.window = None if c.is_global[layer_idx] else c.sliding_window
        self.num_heads, self.num_kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim, self.v_head_dim, self.num_meta = c.head_dim, c.v_head_dim, c.num_memory_tokens
        kv_width = c.k_width + c.v_width if self.is_producer else 0
        self.splits = [c.hidden_size, kv_width, I, I]  # q | k v | x | z  (spec 6.2)
        self.ssm_splits = [R, N, N]  # dt | B | C  (spec 6.4 step 2)

        self.in_proj = nn.Linear(c.hidden_size, c.in_proj_width(layer_idx), bias=c.mamba_proj_bias)
        self.conv1d = nn.Conv1d(I, I, c.mamba_d_conv, groups=I, bias=c.mamba_conv_bias)
        self.x_proj = nn.ModuleList([nn.Linear(I, R + 2 * N, bias=False)])
        self.dt_proj = nn.ModuleList([nn.Linear(R, I, bias=True)])
        self.A_log = nn.ParameterList([nn.Parameter(torch.empty(I, N))])
        self.D = nn.ParameterList([nn.Parameter(torch.empty(I))])
        self.inner_norms = c.mamba_inner_layernorms
        if self.inner_norms:
            self.dt_layernorm = RMSNorm(R, c.rms_norm_eps)
            self.B_layernorm = RMSNorm(N, c.rms_norm_eps)
            self.C_layernorm = RMSNorm(N, c.rms_norm_eps)
        self.pre_avg_layernorm1 = RMSNorm(I, c.rms_norm_eps)  # attention branch
        self.pre_avg_layernorm2 = RMSNorm(I, c.rms_norm_eps)  # SSM branch
        self.out_proj = nn.Linear(I, c.hidden_size, bias=c.mamba_proj_bias)

    def prepare(self) -> None:
        """Derived fp32 tensors, computed once after loading."""
        self.A = -torch.exp(self.A_log[0].float())  # (I, N) fp32
        self.conv_weight = self.conv1d.weight[:, 0, :].float()  # (I, K) fp32

    def forward(self, a, h, state: DecodeState, start: int, stash: dict, cos, sin, valid=None) -> torch.Tensor:
        """Prefill. a: (T, D) normalized input for positions start .. start+T-1; returns h + the mixer's output
        (T, D), the residual added by out_proj. valid: see HymbaForCausalLM.prefill_padded."""
        T = a.shape[0]
        i, H, dq, M = self.layer_idx, self.num_heads, self.head_dim, self.num_meta
        proj = linear(a, self.in_proj.weight, self.in_proj.bias)  # (T, q | k v | x | z) fp32
        _, _, x, z = proj.split(self.splits, dim=-1)
        k_buf, v_buf = state.k[self.producer], state.v[self.producer]
        q = torch.empty(T, H, dq, dtype=k_buf.dtype, device=a.device)

        # --- attention heads ---
        if self.is_producer:  # consumers of this layer reuse exactly this key set in this call (spec 6.3)
            history = state.history_range(i, start)  # (meta rows, first recent position, history rows)
            S = history[2] + T
            keys = torch.empty(k_buf.shape[0], S, dq, dtype=k_buf.dtype, device=a.device)
            values = torch.empty(v_buf.shape[0], S, self.v_head_dim, dtype=v_buf.dtype, device=a.device)
            ring = state.window[i]  # the buffer's ring (the window, or shorter for a short context)
            kernels.rope_prefill(proj, cos, sin, q, keys, values, k_buf, v_buf, history, M, ring)
            stash[i] = (keys, values, _positions(stash, history[0], history[1], start + T, a.device))
            new = slice(history[2], S)  # post-RoPE keys are what the buffer keeps (Q4)
            kernels.store_kv(keys[:, new], values[:, new], k_buf, v_buf, start, M, ring, valid)
        else:
            kernels.rope_prefill(proj, cos, sin, q)
        keys, values, k_pos = stash[self.producer]
        q_pos = _positions(stash, 0, start, start + T, a.device)
        attn = kernels.attention_prefill(q, keys, values, q_pos, k_pos, self.window, M)

        # --- SSM heads ---
        u = kernels.causal_conv1d(x, self.conv_weight, self.conv1d.bias, state.conv[i], valid)  # (T, I)
        dt, B, C = linear(u, self.x_proj[0].weight).split(self.ssm_splits, dim=-1)
        if self.inner_norms:
            dt, B, C = self.dt_layernorm(dt, self.dt_proj[0].weight.dtype), self.B_layernorm(B), self.C_layernorm(C)
        dt = linear(dt, self.dt_proj[0].weight)  # its bias is added in fp32 inside the softplus (Q8)
        y = kernels.selective_scan(u, dt, self.A, B, C, self.D[0], z, self.dt_proj[0].bias, state.ssm[i], valid=valid)

        norm1, norm2 = self.pre_avg_layernorm1, self.pre_avg_layernorm2
        mixed = torch.empty(T, y.shape[1], dtype=self.out_proj.weight.dtype, device=y.device)  # out_proj's operand
        kernels.rms_norm_average(attn.reshape(T, -1), y, norm1.weight, norm2.weight, norm1.eps, out=mixed)
        return linear(mixed, self.out_proj.weight, self.out_proj.bias, residual=h)

    def decode_attention(self, proj, state: DecodeState, indices: dict, cos, sin) -> torch.Tensor:
        """Decode, the attention heads for one token from its in_proj output proj (fp32, q | k v | x | z): RoPE, a
        producer's KV write and attention in one launch (kernels/attention.py rope_attention_decode).

        Device work only (no host values that change per token), so a CUDA graph can capture it, as for
        decode_ssm. Returns (H * dv,) in the KV dtype."""
        k_buf, v_buf = state.k[self.producer], state.v[self.producer]
        slot, num_valid = indices[self.producer]  # a producer writes the position `window` back's slot (7.2)
        out = kernels.rope_attention_decode(proj, self.num_heads, state.pos, cos, sin, k_buf, v_buf, num_valid, slot,
                                            write_kv=self.is_producer)  # fmt: skip
        return out.view(-1)

    def decode_ssm(self, proj, state: DecodeState) -> torch.Tensor:
        """Decode, the SSM heads for one token from its in_proj output; returns the gated output (d_inner,) fp32."""
        i = self.layer_idx
        _, _, x, z = proj.split(self.splits)
        u = kernels.causal_conv1d_update(x, self.conv_weight, self.conv1d.bias, state.conv[i])
        dbc = kernels.gemv(u, self.x_proj[0].weight)
        norms = None
        if self.inner_norms:
            norms = (self.dt_layernorm.weight, self.B_layernorm.weight, self.C_layernorm.weight)
        eps = self.pre_avg_layernorm1.eps
        dt_proj = self.dt_proj[0]
        return kernels.ssm_update(state.ssm[i], u, dbc, dt_proj.weight, dt_proj.bias, self.A, self.D[0], z, norms, eps)


class MLP(nn.Module):
    def __init__(self, c: HymbaConfig):
        super().__init__()
        self.is_gated = c.mlp_hidden_act == "silu"
        if self.is_gated:
            self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x: (T, D), ideally already in the weights' dtype (the operand of both products); returns h + the MLP's
        output, the residual added by the down projection."""
        dtype = self.down_proj.weight.dtype
        if self.is_gated:  # SwiGLU, written in the down projection's operand dtype
            act = kernels.swiglu(linear(x, self.gate_proj.weight), linear(x, self.up_proj.weight), dtype)
        else:
            act = F.relu(linear(x, self.up_proj.weight)).square()  # relu2
        return linear(act, self.down_proj.weight, residual=h)


class MoE(nn.Module):
    """The reference wraps its MLP in a one-expert container; it only shows in the weight names."""

    def __init__(self, c: HymbaConfig):
        super().__init__()
        self.experts = nn.ModuleList([MLP(c)])

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.experts[0](x, h)


class HymbaLayer(nn.Module):
    def __init__(self, c: HymbaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mamba = HybridMixer(c, layer_idx)
        self.pre_moe_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.moe = MoE(c)

    def forward(self, h, state, start, stash, cos, sin, valid=None) -> torch.Tensor:
        """Prefill: h (T, D) -> (T, D)."""
        dtype = self.mamba.in_proj.weight.dtype  # the norms write the products' operands directly
        h = self.mamba(self.input_layernorm(h, dtype), h, state, start, stash, cos, sin, valid)
        return self.moe(self.pre_moe_layernorm(h, dtype), h)

    def decode(self, h: torch.Tensor, state: DecodeState, indices: dict, cos, sin, side_stream=None) -> None:
        """Decode: h (D,) fp32, updated in place. Each norm runs inside the matrix-vector product after it and
        each residual add inside the one before it (kernels/gemv.py): eight launches per layer, each with
        programmatic dependent launch on CUDA (it launches while the kernel before it runs, then waits for it). With
        a side stream (CUDA) the SSM heads' three small kernels run beside the attention heads' one: at batch 1 each
        is a few µs of mostly latency, and the two chains only meet at out_proj (on one stream, even with PDL, the
        step measured 12 % slower)."""
        mixer, mlp, eps = self.mamba, self.moe.experts[0], self.input_layernorm.eps
        proj = kernels.norm_gemv(h, self.input_layernorm.weight, eps, mixer.in_proj.weight, mixer.in_proj.bias)
        if side_stream is None:
            attn = mixer.decode_attention(proj, state, indices, cos, sin)
            y = mixer.decode_ssm(proj, state)
        else:
            main = torch.cuda.current_stream()
            side_stream.wait_stream(main)
            with torch.cuda.stream(side_stream):
                y = mixer.decode_ssm(proj, state)
            attn = mixer.decode_attention(proj, state, indices, cos, sin)
            main.wait_stream(side_stream)  # fork and join within the layer keep every buffer's reuse ordered
        norm1, norm2 = mixer.pre_avg_layernorm1, mixer.pre_avg_layernorm2
        kernels.norm_average_gemv(attn, y, norm1.weight, norm2.weight, eps, mixer.out_proj.weight, mixer.out_proj.bias,
                                  residual=h, out=h)  # fmt: skip
        gate = mlp.gate_proj.weight if mlp.is_gated else None
        act = kernels.mlp_gemv(h, self.pre_moe_layernorm.weight, eps, gate, mlp.up_proj.weight)
        kernels.gemv(act, mlp.down_proj.weight, residual=h, out=h)


class HymbaBackbone(nn.Module):
    """`model.*` in the checkpoint."""

    def __init__(self, c: HymbaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        if c.num_memory_tokens:
            self.memory_tokens = nn.Parameter(torch.empty(c.num_memory_tokens, c.hidden_size))
        self.layers = nn.ModuleList([HymbaLayer(c, i) for i in range(c.num_hidden_layers)])
        self.final_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class HymbaForCausalLM(nn.Module):
    def __init__(self, config: HymbaConfig):
        super().__init__()
        self.config = config
        self.model = HymbaBackbone(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    def from_tensors(cls, config: HymbaConfig, tensors: dict[str, torch.Tensor], max_positions: int):
        """Build on the meta device, then take the loaded tensors as they are (names checked by weights.py)."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(tensors, strict=True, assign=True)
        model.requires_grad_(False)
        for layer in model.model.layers:
            layer.mamba.prepare()
        model.cos, model.sin = rope_tables(config, max_positions, model.model.embed_tokens.weight.device)
        model.side_stream = None  # decode's second CUDA stream, made on first use
        model.persistent = None  # decode's persistent kernel, bound to one DecodeState (use_persistent)
        return model

    def use_persistent(self, state: DecodeState) -> str | None:
        """Run decode steps on `state` through the persistent kernel where it fits (engine/persistent.py); returns
        why not otherwise, leaving every layer on the per-layer path."""
        from engine import persistent

        self.persistent = None
        reason = persistent.unsupported(self, state)
        if reason is None:
            try:
                self.persistent = persistent.build(self, state)
            except Exception as e:  # too few multiprocessors, no NVRTC, a torch without its helpers: the per-layer
                reason = f"the persistent kernel did not build: {type(e).__name__}: {e}"  # path serves, and says why
        return reason

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    @torch.no_grad()
    def prefill_meta_tokens(self, state: DecodeState) -> None:
        """Run the meta tokens through an empty state and keep the result as every request's start (spec 8)."""
        state.clear()
        if self.config.num_memory_tokens:
            self._run(self.model.memory_tokens.float(), state)
        state.save_snapshot()

    @torch.no_grad()
    def prefill(
        self, ids: torch.Tensor, state: DecodeState, all_logits: bool = False, chunk_size: int = DEFAULT_PREFILL_CHUNK
    ) -> torch.Tensor:
        """Prompt tokens on top of `state`, chunk by chunk (same logits as one pass: spec 7.3).

        ids: (n,) int64; returns fp32 logits (n, V) if all_logits else (V,) for the last position.
        """
        assert ids.ndim == 1 and ids.numel() > 0, "prefill needs at least one token"
        rows = []
        for c0 in range(0, ids.numel(), chunk_size):
            h = self._run(self._embed(ids[c0 : c0 + chunk_size]), state)
            rows.append(self._logits(h if all_logits else h[-1:]))
        return torch.cat(rows) if all_logits else rows[-1][0]

    @torch.no_grad()
    def prefill_padded(self, ids: torch.Tensor, valid: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """One chunk of a request's prompt padded to a fixed length, at positions from state.num_tokens, for
        engine/graph.py to capture once per (start, length): ids (T,) int64 of which the first `valid` (a 0-d int64
        device tensor, 1 <= valid <= T) are the prompt's. Returns the (V,) fp32 logits of the last real row. Device
        work only; the caller advances state.num_tokens by valid afterwards.

        Why padding is exact: the caller pads only a prompt's last chunk, and its padding rows come after every real
        row, so causal attention hides them from the real ones; they leave the conv and SSM states alone and no KV
        buffer slot is written from them (`valid` is read by those kernels on the device)."""
        h = self._layers(self._embed(ids), state, state.num_tokens, valid)
        return self._logits(h.index_select(0, (valid - 1).view(1)))[0]

    @torch.no_grad()
    def decode(self, token: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """One generated token (0-d or (1,) int64) at position state.num_tokens; returns (V,) fp32 logits."""
        if state.num_tokens >= state.max_positions:
            raise ValueError(f"position {state.num_tokens} is past the context limit ({state.max_positions} positions)")
        logits = self.decode_step(token, state)
        state.num_tokens += 1
        return logits

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """decode() without the host's bookkeeping: device work only, reading the position from state.pos and
        advancing it, so engine/graph.py captures it once as a CUDA graph. The caller keeps state.num_tokens and
        checks the context limit. An out-of-vocabulary id (the sampler's -1) is clamped rather than faulting the
        device: the engine discards such a step."""
        embed = self.model.embed_tokens.weight
        h, idx = kernels.step_inputs(token, embed, state.pos, state.groups, state.num_meta)  # h: (D,) fp32 residual
        indices = state.decode_indices(idx)
        if h.is_cuda and self.side_stream is None:
            self.side_stream = torch.cuda.Stream(h.device)
        fast = self.persistent if self.persistent is not None and self.persistent.state is state else None
        fast = fast if kernels.on_triton(h) else None  # use_triton(False): the twins, every layer
        runs = dict(fast.segments) if fast is not None else {}  # first layer -> end of a run the kernel takes
        if fast is not None:
            fast.kernel.begin_step()
        layers, i = self.model.layers, 0
        while i < len(layers):
            if i in runs:  # a run of layers, one launch (kernels/persistent_decode.py)
                fast.kernel(h, i, runs[i], indices[fast.sliding][0], indices[fast.glob][0], self.cos, self.sin)
                i = runs[i]
                continue
            layers[i].decode(h, state, indices, self.cos, self.sin, self.side_stream if h.is_cuda else None)
            i += 1
        norm = self.model.final_layernorm
        logits = kernels.norm_gemv(h, norm.weight, norm.eps, self.lm_head_weight)
        state.pos += 1
        return logits

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.model.embed_tokens.weight).float()  # (T, D) fp32 residual stream

    def _run(self, h: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """h: (T, D) embeddings of positions state.num_tokens ...; returns the final hidden states (T, D)."""
        start, T = state.num_tokens, h.shape[0]
        h = self._layers(h, state, start)
        state.set_num_tokens(start + T)
        return h

    def _layers(self, h: torch.Tensor, state: DecodeState, start: int, valid=None) -> torch.Tensor:
        T = h.shape[0]
        if start + T > state.max_positions:
            raise ValueError(f"position {start + T - 1} is past the context limit ({state.max_positions} positions)")
        cos, sin = self.cos[start : start + T], self.sin[start : start + T]
        stash: dict = {}  # producer layer -> (keys, values, key positions) of this prefill call; position tensors
        for layer in self.model.layers:
            h = layer(h, state, start, stash, cos, sin, valid)
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits (spec 6.1 step 5)."""
        return linear(self.model.final_layernorm(h, self.lm_head_weight.dtype), self.lm_head_weight)
