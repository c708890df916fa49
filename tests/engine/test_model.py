"""The model over a DecodeState: chunked prefill, the meta-token snapshot, and the prefill/decode window rules."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from engine.loader import load_model

CONFORMANCE = "tests/data/conformance"
CONFIGS = ["hymba-mirror-12L", "hymba-gqa-untied-7L", "hymba-odd-6L"]


@pytest.fixture(scope="module", params=CONFIGS)
def loaded(request):
    folder = f"{CONFORMANCE}/{request.param}"
    config, model, state = load_model(folder, "cpu", "float32", max_model_len=96)
    return config, model, state, load_file(f"{folder}/vectors.safetensors")


def random_prompt(config, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.vocab_size, (n,), generator=g)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64], ids=lambda c: f"chunk{c}")
def test_chunked_prefill_equals_one_prefill(loaded, chunk_size):
    config, model, state, _ = loaded
    ids = random_prompt(config, 2 * (config.sliding_window or 8) + config.num_memory_tokens + 5, seed=chunk_size)
    state.reset()
    whole = model.prefill(ids, state, all_logits=True)
    whole_ssm, whole_conv = state.ssm.clone(), state.conv.clone()
    state.reset()
    chunked = model.prefill(ids, state, all_logits=True, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, whole, atol=2e-4, rtol=0)  # fp32 summation-order noise (logit std ~2.5)
    torch.testing.assert_close(state.ssm, whole_ssm, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state.conv, whole_conv, atol=1e-5, rtol=1e-4)
    # and decoding on from either state gives the same next logits
    token = torch.tensor(5)
    after_chunked = model.decode(token, state)
    state.reset()
    model.prefill(ids, state)
    torch.testing.assert_close(
        after_chunked, model.decode(token, state), atol=2e-4, rtol=0
    )  # fp32 summation-order noise (logit std ~2.5)


def test_meta_snapshot_equals_prefilling_the_meta_tokens(loaded):
    """reset() copies the post-meta state; recomputing it from an empty state must give the same logits."""
    config, model, state, vec = loaded
    prompt = vec["case1.prompt_ids"]
    state.reset()
    from_snapshot = model.prefill(prompt, state, all_logits=True)
    snapshot_ssm = state.ssm.clone()
    model.prefill_meta_tokens(state)  # recompute the snapshot from scratch (empty state, meta tokens)
    state.reset()
    torch.testing.assert_close(model.prefill(prompt, state, all_logits=True), from_snapshot, atol=0, rtol=0)
    torch.testing.assert_close(state.ssm, snapshot_ssm, atol=0, rtol=0)
    assert state.num_tokens == config.num_memory_tokens + prompt.numel()


def test_reset_forgets_the_previous_request(loaded):
    config, model, state, vec = loaded
    prompt = vec["case2.prompt_ids"]
    state.reset()
    first = model.prefill(prompt, state)
    state.reset()
    model.prefill(random_prompt(config, 40, seed=1), state)  # a different request in between
    for t in range(5):
        model.decode(torch.tensor(3 + t), state)
    state.reset()
    torch.testing.assert_close(model.prefill(prompt, state), first, atol=0, rtol=0)


def test_decode_equals_prefill_until_the_window_is_cut(loaded):
    """Spec 7.3: split (prefill + decode) equals one prefill while decode queries are below W + M, then differs."""
    config, model, state, _ = loaded
    W, M = config.sliding_window, config.num_memory_tokens
    ids = random_prompt(config, W + 6, seed=3)
    n = 2
    state.reset()
    whole = model.prefill(ids, state, all_logits=True)
    state.reset()
    rows = [model.prefill(ids[:n], state)]
    for t in range(n, ids.numel()):
        rows.append(model.decode(ids[t], state))
    split = torch.stack(rows)  # row r: logits after position M + n - 1 + r, like whole[n - 1 + r]
    first_cut = W + M - (M + n - 1)  # decode row whose query index reaches W + M
    torch.testing.assert_close(
        split[:first_cut], whole[n - 1 : n - 1 + first_cut], atol=2e-4, rtol=0
    )  # fp32 summation-order noise (logit std ~2.5)
    assert (split[first_cut:] - whole[n - 1 + first_cut :]).abs().max() > 1e-3


def test_residual_stream_matches_the_golden_debug_vector(loaded):
    """The per-layer residual of case 1 (meta rows included) localizes a bug to a layer."""
    config, model, state, vec = loaded
    golden = vec["debug.case1.residual_per_layer"]  # (layers + 1, M + n, D)
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(o.clone())) for layer in model.model.layers]
    try:
        model.prefill_meta_tokens(state)
        meta_rows = seen[:]
        seen.clear()
        state.reset()
        model.prefill(vec["case1.prompt_ids"], state)
    finally:
        for h in hooks:
            h.remove()
    for layer_idx in range(config.num_hidden_layers):
        got = torch.cat([meta_rows[layer_idx], seen[layer_idx]])
        torch.testing.assert_close(got, golden[layer_idx + 1], atol=1e-4, rtol=1e-4, msg=f"layer {layer_idx}")


def test_context_limit_is_enforced(loaded):
    config, model, state, _ = loaded
    state.reset()
    with pytest.raises(ValueError, match="context limit"):
        model.prefill(random_prompt(config, 97, seed=4), state)


# (tokens before the chunk, real tokens in it, padded rows T): a first chunk shorter than every window, one longer
# than the windows (8 and 16) with padding past them, a later chunk after a full one, all of it padding but one row
@pytest.mark.parametrize("first, n, T", [(0, 1, 16), (0, 6, 16), (0, 16, 16), (0, 5, 24), (0, 23, 40), (24, 3, 24),
                                         (24, 20, 32), (40, 1, 40)])  # fmt: skip
def test_a_padded_chunk_gives_the_unpadded_logits_and_state(loaded, first, n, T):
    """prefill_padded (what engine/graph.py captures) on a prompt's last chunk, n tokens padded to T rows, after
    `first` tokens: the last prompt token's logits, the conv and SSM states, every KV slot decode can read, and the
    decode step after it are those of prefill."""
    config, model, state, _ = loaded
    ids = random_prompt(config, first + n, seed=first + n)
    M = config.num_memory_tokens
    state.reset()
    want = model.prefill(ids, state)
    want_conv, want_ssm = state.conv.clone(), state.ssm.clone()
    readable = {i: state.num_valid(i, M + first + n) for i in state.k}  # filled slots (a ring's, once it wraps)
    want_k = {i: k[:, : readable[i]].clone() for i, k in state.k.items()}
    want_v = {i: v[:, : readable[i]].clone() for i, v in state.v.items()}
    want_decode = model.decode(torch.tensor(7), state)

    state.reset()
    if first:
        model.prefill(ids[:first], state)
    padding = torch.full((T - n,), config.vocab_size - 1)  # any ids: their rows must not reach the prompt's
    got = model.prefill_padded(torch.cat([ids[first:], padding]), torch.tensor(n), state)
    state.set_num_tokens(M + first + n)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)  # fp32 summation-order noise (logit std ~2.5)
    torch.testing.assert_close(state.conv, want_conv, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state.ssm, want_ssm, atol=1e-5, rtol=1e-4)
    for i in state.k:
        torch.testing.assert_close(state.k[i][:, : readable[i]], want_k[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(state.v[i][:, : readable[i]], want_v[i], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.decode(torch.tensor(7), state), want_decode, atol=2e-4, rtol=0)
