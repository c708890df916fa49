"""HymbaConfig: a checkpoint's config.json, validated, with the layout the reference derives from it.

Keys keep the checkpoint's own names (spec section 2). Anything the reference cannot run, or that we do not
support, is rejected here with one line naming the key, the value and what is expected (spec section 11).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ROPE_TYPES = (None, "default", "ntk")


class ConfigError(ValueError):
    """A config.json that cannot be served; the message is one line naming the file and the key."""


@dataclass(frozen=True, slots=True)
class HymbaConfig:
    # --- keys of config.json (spec section 2) ---
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_memory_tokens: int
    sliding_window: int | None  # None: every layer is global
    global_attn_idx: tuple[int, ...]
    kv_reuse_group: tuple[tuple[int, ...], ...]
    mamba_d_state: int
    mamba_d_conv: int
    mamba_expand: int
    mamba_conv_bias: bool
    mamba_proj_bias: bool
    mamba_inner_layernorms: bool
    mlp_hidden_act: str  # "silu" (SwiGLU) or "relu2" (up -> relu^2 -> down)
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope: bool
    rope_type: str | None
    rope_theta: float
    max_position_embeddings: int
    orig_max_position_embeddings: int
    bos_token_id: int | None
    eos_token_id: tuple[int, ...]
    pad_token_id: int | None
    torch_dtype: str | None
    # --- derived layout (spec section 3) ---
    head_dim: int  # dq: query/key head dim, D / H
    d_inner: int  # I = expand * D
    v_head_dim: int  # dv = I / H (config.json's own v_head_dim is ignored, quirk Q12)
    dt_rank: int  # R
    is_global: tuple[bool, ...]  # per layer: full causal attention, else sliding window + meta tokens
    kv_producer: tuple[int, ...]  # per layer: the layer whose K/V it attends over (itself if it produces)

    @property
    def is_kv_producer(self) -> tuple[bool, ...]:
        return tuple(p == i for i, p in enumerate(self.kv_producer))

    @property
    def k_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def v_width(self) -> int:
        return self.num_key_value_heads * self.v_head_dim

    def in_proj_width(self, layer_idx: int) -> int:
        """Rows of in_proj: q | k | v | x | z for producers, q | x | z for consumers (spec 6.2)."""
        kv = self.k_width + self.v_width if self.is_kv_producer[layer_idx] else 0
        return self.hidden_size + kv + 2 * self.d_inner

    @property
    def rope_base(self) -> float:
        """Static NTK scaling with factor 2 (spec section 5), computed in double as the reference does."""
        if self.rope_type != "ntk":
            return self.rope_theta
        ratio = 2 * self.max_position_embeddings / self.orig_max_position_embeddings - 1
        return self.rope_theta * ratio ** (self.head_dim / (self.head_dim - 2))

    @classmethod
    def from_json(cls, path: str | Path) -> HymbaConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=path.name)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> HymbaConfig:
        r = _Reader(raw, source)
        if (model_type := raw.get("model_type", "hymba")) != "hymba":
            r.fail("model_type", model_type, "'hymba'")

        D = r.int("hidden_size")
        H = r.int("num_attention_heads")
        Hk = r.int("num_key_value_heads")
        L = r.int("num_hidden_layers")
        expand = r.int("mamba_expand")
        if D % H:
            r.fail("hidden_size", D, f"a multiple of num_attention_heads ({H})")
        if H % Hk:
            r.fail("num_key_value_heads", Hk, f"a divisor of num_attention_heads ({H})")
        d_inner = expand * D
        if d_inner % H:
            r.fail("mamba_expand", expand, f"expand*hidden_size divisible by num_attention_heads ({H})")
        head_dim, v_head_dim = D // H, d_inner // H
        # Quirk Q13: the reference computes the k/v widths in floating point; they must agree with ours.
        if int(Hk / H * D) != Hk * head_dim or int(Hk / H * D * expand) != Hk * v_head_dim:
            r.fail(
                "num_key_value_heads",
                Hk,
                f"a value whose k/v widths the reference computes exactly "
                f"(int({Hk}/{H}*{D}) = {int(Hk / H * D)}, not {Hk * head_dim})",
            )
        if raw.get("v_head_dim") not in (None, -1, v_head_dim):
            warnings.warn(
                f"{source}: v_head_dim={raw['v_head_dim']} is ignored; the reference uses "
                f"mamba_expand*hidden_size/num_attention_heads = {v_head_dim}",
                stacklevel=2,
            )

        # Keys whose other values change the math in ways the reference (or we) do not run.
        r.expect("attn_hidden_size", -1, allowed=(-1, D, None))
        r.expect("kq_head_dim", -1, allowed=(-1, head_dim, None))
        r.expect("kq_norm", "none", allowed=("none", None))
        r.expect("num_experts", 1, allowed=(1, None))
        r.expect("num_experts_per_tok", 1, allowed=(1, None))
        r.expect("memory_tokens_interspersed_every", 0, allowed=(0, None))
        r.expect("hidden_act", "silu", allowed=("silu", "swish", None))  # the conv activation (Q14)
        r.expect("mlp_hidden_act", "silu", allowed=("silu", "relu2", None))
        if (every := raw.get("kv_reuse_every_i_layer", -1)) not in (-1, 0, None):
            r.fail("kv_reuse_every_i_layer", every, "-1 (only kv_reuse_group sharing is supported)")
        rope_type = raw.get("rope_type")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            r.fail("rope_type", rope_type, "one of null, 'default', 'ntk'")

        window = raw.get("sliding_window")
        # quirk Q6: the reference's KV cut duplicates the meta tokens for W = 1
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 2):
            r.fail("sliding_window", window, "an int >= 2 or null")
        global_idx = r.layer_list("global_attn_idx", L) if window is not None else tuple(range(L))
        is_global = tuple(i in global_idx for i in range(L))
        kv_producer = _kv_producers(r, L, is_global)

        dt_rank = raw.get("mamba_dt_rank", "auto")
        dt_rank = math.ceil(D / 16) if dt_rank == "auto" else r.int("mamba_dt_rank")
        eos = raw.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos_ids):
            r.fail("eos_token_id", eos, "an int or a list of ints")
        rope = raw.get("rope", False)  # the later HF config class defaults a missing key to false
        if not isinstance(rope, bool):
            r.fail("rope", rope, "true or false")
        if (rope and head_dim % 2) or (rope and rope_type == "ntk" and head_dim <= 2):
            r.fail(
                "num_attention_heads",
                H,
                f"a head count giving an even head dim (> 2 for ntk) for RoPE; "
                f"hidden_size/num_attention_heads = {head_dim}",
            )
        is_ntk = bool(rope) and rope_type == "ntk"
        max_pos = r.int("max_position_embeddings", default=None if is_ntk else 8192)
        orig_max_pos = r.int("orig_max_position_embeddings", default=None if is_ntk else 2048)
        if is_ntk and 2 * max_pos <= orig_max_pos:  # the NTK scale 2*max/orig - 1 must be positive
            r.fail("max_position_embeddings", max_pos, f"> orig_max_position_embeddings / 2 ({orig_max_pos / 2:g})")

        return cls(
            vocab_size=r.int("vocab_size"),
            hidden_size=D,
            intermediate_size=r.int("intermediate_size"),
            num_hidden_layers=L,
            num_attention_heads=H,
            num_key_value_heads=Hk,
            num_memory_tokens=r.int("num_memory_tokens", default=128, minimum=0),  # the reference's default
            sliding_window=window,
            global_attn_idx=global_idx,
            kv_reuse_group=tuple(tuple(g) for g in raw.get("kv_reuse_group") or ()),
            mamba_d_state=r.int("mamba_d_state"),
            mamba_d_conv=r.int("mamba_d_conv", minimum=2),
            mamba_expand=expand,
            mamba_conv_bias=r.bool("mamba_conv_bias", True),
            mamba_proj_bias=r.bool("mamba_proj_bias", False),
            mamba_inner_layernorms=r.bool("mamba_inner_layernorms", True),
            mlp_hidden_act=raw.get("mlp_hidden_act") or "silu",
            rms_norm_eps=r.float("rms_norm_eps", 1e-6),
            tie_word_embeddings=r.bool("tie_word_embeddings", True),
            rope=rope,
            rope_type=rope_type,
            rope_theta=r.float("rope_theta", 10000.0),
            max_position_embeddings=max_pos,
            orig_max_position_embeddings=orig_max_pos,
            bos_token_id=r.optional_int("bos_token_id", 1),
            eos_token_id=eos_ids,
            pad_token_id=r.optional_int("pad_token_id", 0),
            torch_dtype=raw.get("torch_dtype"),
            head_dim=head_dim,
            d_inner=d_inner,
            v_head_dim=v_head_dim,
            dt_rank=dt_rank,
            is_global=is_global,
            kv_producer=kv_producer,
        )


def _kv_producers(r: _Reader, num_layers: int, is_global: tuple[bool, ...]) -> tuple[int, ...]:
    """kv_producer[i]: the first layer of i's kv_reuse_group, or i itself (spec section 4)."""
    producer = list(range(num_layers))
    groups = r.raw.get("kv_reuse_group") or []
    if not isinstance(groups, list) or not all(isinstance(g, list) and g for g in groups):
        r.fail("kv_reuse_group", groups, "a list of non-empty lists of layer indices")
    seen: set[int] = set()
    for g in groups:
        for i in g:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers:
                r.fail("kv_reuse_group", g, f"layer indices in [0, {num_layers})")
            if i in seen:
                r.fail("kv_reuse_group", g, f"each layer in at most one group (layer {i} repeats)")
            seen.add(i)
        if sorted(g) != g:
            r.fail("kv_reuse_group", g, "ascending indices (the first layer produces the K/V the rest reuse)")
        if len({is_global[i] for i in g}) > 1:  # quirk Q3: such groups get a different decode window
            r.fail("kv_reuse_group", g, "groups of only global or only sliding-window layers (global_attn_idx)")
        for i in g[1:]:
            producer[i] = g[0]
    return tuple(producer)


class _Reader:
    """Typed access to the raw dict; every failure names the file, the key, the value and the expectation."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw, self.source = raw, source

    def fail(self, key: str, value: Any, expected: str) -> None:
        raise ConfigError(f"{self.source}: {key} must be {expected}, got {value!r}")

    def int(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        value = self.raw.get(key, default)
        if value is None and key not in self.raw:
            raise ConfigError(f"{self.source}: missing required key {key} (an int >= {minimum})")
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self.fail(key, value, f"an int >= {minimum}")
        return value

    def optional_int(self, key: str, default: int | None) -> int | None:
        value = self.raw.get(key, default)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            self.fail(key, value, "an int or null")
        return value

    def float(self, key: str, default: float) -> float:
        value = self.raw.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            self.fail(key, value, "a positive number")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, value, "true or false")
        return value

    def expect(self, key: str, wanted: Any, allowed: tuple[Any, ...]) -> None:
        value = self.raw.get(key)
        if isinstance(value, bool) or value not in allowed:  # True == 1, but no allowed value here is a bool
            self.fail(key, value, f"{wanted!r} (other values are not supported)")

    def layer_list(self, key: str, num_layers: int) -> tuple[int, ...]:
        value = self.raw.get(key) or []
        ok = isinstance(value, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers for i in value
        )
        if not ok:
            self.fail(key, value, f"a list of layer indices in [0, {num_layers})")
        return tuple(sorted(set(value)))
