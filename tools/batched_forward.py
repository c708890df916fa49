"""A batched, full-sequence, differentiable Hymba forward for training, over the engine's own module tree.

engine/model.py serves one request at a time over a DecodeState, and on CUDA its modules call forward-only Triton
kernels (RMSNorm included). Training needs whole sequences in batches and gradients, so forward() runs the parameters
of the same HymbaForCausalLM (names as in the checkpoint) through plain tensor ops: the engine's rope_tables and
kernels.prefill_kv.apply_rope, one attention call per layer with the prefill masks of spec 7.1, and a chunked
selective scan (sequential inside a chunk, every chunk at once, then a short pass that carries the state from chunk
to chunk).
max_logit_gap() checks the result against the engine's own prefill.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.config import HymbaConfig
from engine.model import HybridMixer, HymbaForCausalLM, HymbaLayer, RMSNorm, rope_tables
from kernels.prefill_kv import apply_rope

SCAN_CHUNK = 16  # tokens scanned one by one inside a chunk; about sqrt(2/3 * sequence length) balances both passes


def build_model(config: HymbaConfig, device: torch.device | str) -> HymbaForCausalLM:
    """Freshly initialized parameters (from torch's global RNG: seed it first), named as in the checkpoint."""
    with torch.device(device):
        model = HymbaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # anything init_weights misses shows up below
        init_weights(model, config)
    missed = [name for name, p in model.named_parameters() if p.isnan().any()]
    assert not missed, f"init_weights left {missed} uninitialized"
    return model


@torch.no_grad()
def init_weights(model: HymbaForCausalLM, config: HymbaConfig) -> None:
    """Mamba's initialization for the SSM (S4D-real A, dt log-uniform in [1e-3, 0.1]), GPT-2's for the rest."""
    std = 0.02  # config.json's initializer_range
    residual_std = std / math.sqrt(2 * config.num_hidden_layers)  # the two projections that write to the residual
    backbone = model.model
    nn.init.normal_(backbone.embed_tokens.weight, std=std)
    if not config.tie_word_embeddings:
        nn.init.normal_(model.lm_head.weight, std=std)
    if config.num_memory_tokens:
        nn.init.normal_(backbone.memory_tokens, std=std)
    I, N, R = config.d_inner, config.mamba_d_state, config.dt_rank
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
    for layer in backbone.layers:
        mixer = layer.mamba
        nn.init.normal_(mixer.in_proj.weight, std=std)
        nn.init.normal_(mixer.x_proj[0].weight, std=std)
        nn.init.normal_(mixer.out_proj.weight, std=residual_std)
        for bias in (mixer.in_proj.bias, mixer.out_proj.bias):
            if bias is not None:
                bias.zero_()
        mixer.conv1d.reset_parameters()
        nn.init.uniform_(mixer.dt_proj[0].weight, -(R**-0.5), R**-0.5)
        dt = torch.exp(torch.rand(I) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        mixer.dt_proj[0].bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt
        mixer.A_log[0].copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(I, N))
        mixer.D[0].fill_(1.0)
        expert = layer.moe.experts[0]
        for proj in (getattr(expert, "gate_proj", None), expert.up_proj):
            if proj is not None:
                nn.init.normal_(proj.weight, std=std)
        nn.init.normal_(expert.down_proj.weight, std=residual_std)


def forward(model: HymbaForCausalLM, ids: torch.Tensor, checkpoint_ssm: bool = False) -> torch.Tensor:
    """ids: (B, T) int64, each row a prompt -> (B, T, V) fp32 logits, those prefill gives (spec 6.1, 7.1).

    checkpoint_ssm recomputes the scan in the backward pass instead of keeping its (B, L, I, N) states.
    """
    c = model.config
    Bsz, T = ids.shape
    M = c.num_memory_tokens
    h = F.embedding(ids, model.model.embed_tokens.weight).float()  # (B, T, D) fp32 residual stream
    if M:  # spec 6.1: the meta tokens open every sequence
        h = torch.cat([model.model.memory_tokens.float().expand(Bsz, M, -1), h], dim=1)  # (B, L, D)
    L = M + T
    cos, sin = rope_tables(c, L, ids.device)  # positions 0 .. L-1, meta tokens first (spec 5)
    masks = attention_masks(c, L, ids.device)
    stash: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # producer layer -> its post-RoPE (k, v)
    for layer in model.model.layers:
        h = h + mixer_forward(layer.mamba, rms_norm(h, layer.input_layernorm), cos, sin, masks, stash, checkpoint_ssm)
        h = h + mlp(layer, rms_norm(h, layer.pre_moe_layernorm))
    return linear(rms_norm(h[:, M:], model.model.final_layernorm), model.lm_head_weight)  # (B, T, V) fp32


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) -> fp32 (under autocast the product itself runs in bf16)."""
    return F.linear(x, weight, bias).float()


def rms_norm(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    """The engine's RMSNorm in fp32: weight * x / sqrt(mean(x^2) + eps)."""
    x = x.float()
    return norm.weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def mlp(layer: HymbaLayer, x: torch.Tensor) -> torch.Tensor:
    """`moe.experts.0`: SwiGLU (or up -> relu^2 -> down for mlp_hidden_act relu2)."""
    expert = layer.moe.experts[0]
    if expert.is_gated:
        return linear(
            F.silu(linear(x, expert.gate_proj.weight)) * linear(x, expert.up_proj.weight), expert.down_proj.weight
        )
    return linear(F.relu(linear(x, expert.up_proj.weight)).square(), expert.down_proj.weight)


def attention_masks(config: HymbaConfig, L: int, device: torch.device) -> dict[bool, torch.Tensor]:
    """(L, L) bool, True where query i sees key j, keyed by is_global (spec 7.1)."""
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    causal = j <= i
    if config.sliding_window is None:
        return {True: causal, False: causal}
    window = causal & ((j < config.num_memory_tokens) | (i - j <= config.sliding_window))
    return {True: causal, False: window}


def mixer_forward(
    mixer: HybridMixer,
    a: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    masks: dict[bool, torch.Tensor],
    stash: dict[int, tuple[torch.Tensor, torch.Tensor]],
    checkpoint_ssm: bool,
) -> torch.Tensor:
    """a: (B, L, D) normalized input -> (B, L, D): attention heads | SSM heads, normalized, averaged (spec 6.2)."""
    Bsz, L, _ = a.shape
    H, Hk, dq, dv = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim, mixer.v_head_dim
    q, kv, x, z = linear(a, mixer.in_proj.weight, mixer.in_proj.bias).split(mixer.splits, dim=-1)
    q = apply_rope(q.view(Bsz, L, H, dq), cos, sin)  # (B, L, H, dq)
    if mixer.is_producer:  # consumers reuse these post-RoPE keys and values as they are (Q4)
        k, v = kv.split([Hk * dq, Hk * dv], dim=-1)
        stash[mixer.layer_idx] = (apply_rope(k.view(Bsz, L, Hk, dq), cos, sin), v.view(Bsz, L, Hk, dv))
    k, v = stash[mixer.producer]
    group = H // Hk  # query head h reads KV head h // group
    attn = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # (B, H, L, dq); scale 1/sqrt(dq) (Q11)
        k.transpose(1, 2).repeat_interleave(group, dim=1),  # (B, H, L, dq)
        v.transpose(1, 2).repeat_interleave(group, dim=1),  # (B, H, L, dv)
        attn_mask=masks[mixer.window is None],  # the consumer's own rule on its producer's K/V (Q4)
    )
    attn = attn.transpose(1, 2).reshape(Bsz, L, H * dv)  # (B, L, I), head-major
    y = ssm_branch(mixer, x, z, checkpoint_ssm)  # (B, L, I) fp32
    mixed = (rms_norm(attn, mixer.pre_avg_layernorm1) + rms_norm(y, mixer.pre_avg_layernorm2)) / 2
    return linear(mixed, mixer.out_proj.weight, mixer.out_proj.bias)


def ssm_branch(mixer: HybridMixer, x: torch.Tensor, z: torch.Tensor, checkpoint_ssm: bool) -> torch.Tensor:
    """x, z: (B, L, I) -> gated SSM output (B, L, I), all in fp32 whatever autocast says (spec 6.4, 6.5)."""
    with torch.autocast(x.device.type, enabled=False):
        u = F.silu(causal_conv(x.float(), mixer.conv1d.weight, mixer.conv1d.bias))  # (B, L, I)
        dt, B, C = linear(u, mixer.x_proj[0].weight).split(mixer.ssm_splits, dim=-1)
        if mixer.inner_norms:
            dt, B, C = (
                rms_norm(t, n) for t, n in ((dt, mixer.dt_layernorm), (B, mixer.B_layernorm), (C, mixer.C_layernorm))
            )
        delta = F.softplus(linear(dt, mixer.dt_proj[0].weight) + mixer.dt_proj[0].bias.float())  # bias inside (Q8)
        A = -torch.exp(mixer.A_log[0].float())  # (I, N)
        args = (u, delta, A, B, C, mixer.D[0].float(), z.float())
        if checkpoint_ssm and torch.is_grad_enabled():
            return checkpoint(selective_scan, *args, use_reentrant=False)
        return selective_scan(*args)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv as K shifted multiply-adds (cheap to differentiate, unlike a grouped conv1d).

    x: (B, L, I) fp32    weight: (I, 1, K), its last tap on the current token    bias: (I,)    returns (B, L, I)
    """
    L, K = x.shape[1], weight.shape[-1]
    w = weight[:, 0, :].float()  # (I, K)
    out = x * w[:, K - 1] if bias is None else x * w[:, K - 1] + bias.float()
    for k in range(1, K):  # tap K-1-k reads the token k steps back; zeros before the first (meta) token
        out = out + F.pad(x[:, : L - k], (0, 0, k, 0)) * w[:, K - 1 - k]
    return out


def selective_scan(u, delta, A, B, C, D, z, chunk: int = SCAN_CHUNK) -> torch.Tensor:
    """s_t = exp(delta_t A) s_{t-1} + delta_t B_t u_t from s = 0;  out_t = (s_t C_t + D u_t) silu(z_t).

    u, delta, z: (Bt, L, I) fp32    A: (I, N)    B, C: (Bt, L, N)    D: (I,)    returns (Bt, L, I) fp32
    """
    a = torch.exp(delta.unsqueeze(-1) * A)  # (Bt, L, I, N) decay, in (0, 1]
    b = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # (Bt, L, I, N) input
    s = chunked_scan(a, b, chunk)  # (Bt, L, I, N)
    y = (s * C.unsqueeze(2)).sum(-1) + u * D  # (Bt, L, I)
    return y * F.silu(z)


def chunked_scan(a: torch.Tensor, b: torch.Tensor, chunk: int) -> torch.Tensor:
    """s_t = a_t * s_{t-1} + b_t along dim 1, from s_{-1} = 0. a, b: (Bt, L, ...) -> s: (Bt, L, ...).

    Pass 1 runs the recurrence inside every chunk at once from a zero state, keeping P_t, the decay since the chunk
    began; pass 2 carries the state across chunks; then s_t = local_t + P_t * (state entering the chunk). Only
    multiplies and adds of numbers in (0, 1] and the inputs: no exp of a cumulative sum, so nothing overflows.
    """
    Bt, L = a.shape[:2]
    rest = a.shape[2:]
    pad = -L % chunk
    if pad:  # identity steps: decay 1, input 0
        a = torch.cat([a, a.new_ones(Bt, pad, *rest)], dim=1)
        b = torch.cat([b, b.new_zeros(Bt, pad, *rest)], dim=1)
    num_chunks = (L + pad) // chunk
    a = a.view(Bt, num_chunks, chunk, *rest)
    b = b.view(Bt, num_chunks, chunk, *rest)
    local, decay = [b[:, :, 0]], [a[:, :, 0]]  # each (Bt, num_chunks, ...)
    for t in range(1, chunk):
        local.append(a[:, :, t] * local[-1] + b[:, :, t])
        decay.append(a[:, :, t] * decay[-1])
    local_s, decay_s = torch.stack(local, dim=2), torch.stack(decay, dim=2)  # (Bt, num_chunks, chunk, ...)
    carry = [torch.zeros_like(local[0][:, 0])]  # state entering chunk k: (Bt, ...)
    for k in range(1, num_chunks):
        carry.append(decay[-1][:, k - 1] * carry[-1] + local[-1][:, k - 1])
    s = local_s + decay_s * torch.stack(carry, dim=1).unsqueeze(2)
    return s.view(Bt, num_chunks * chunk, *rest)[:, :L]


def max_logit_gap(model_dir: str | Path, ids: torch.Tensor) -> float:
    """Largest |engine prefill logit - forward() logit| for one prompt (ids: (T,) int64), both in fp32 on the CPU over
    the checkpoint as the server loads it (engine.loader.load_model)."""
    from engine.loader import load_model

    _, model, state = load_model(model_dir, device="cpu", dtype="float32")
    state.reset()
    served = model.prefill(ids, state, all_logits=True)  # (T, V)
    with torch.no_grad():
        trained = forward(model, ids.unsqueeze(0))[0]  # (T, V)
    return (served - trained).abs().max().item()
