"""kernels/persistent_decode.py against the Triton path it replaces, on an H100 (skipped elsewhere).

Hymba-1.5B's shapes with random weights (engine.bench's). Two checks of each launch's arithmetic, and one of whole
generations:
- One global layer (its keys in 1, 2 and 3 tiles) and one sliding producer-consumer pair, from the same state as the
  same layers on the Triton path: the layers' contribution to h agrees within bf16 rounding (measured 4-5.5e-3 of
  it; the bound is 2e-2). A wrong tile, row or mask shows up here at order 1.
- 24 decode steps of all 32 layers after prompts of 40, 1,180 and 3,000 tokens (unfilled ring slots masked; past
  the ring's wrap; three key tiles), both bf16 paths against the same steps in fp32. The kernel rounds every
  product's output to bf16 where the reference model does; the Triton path keeps in_proj's in fp32, so it drifts
  from fp32 less: the kernel's logits and state (SSM, conv, the K/V rows the steps wrote) must stay within 3 times
  the Triton path's error (measured up to 2.3 times, the SSM state after 1,180 tokens). A state that is not carried
  from step to step shows up at order 1.
- A CUDA graph of the persistent step replays it bit for bit; a launch whose blocks cannot all run gives up in one
  timeout; and a wait that gives up fails the request and leaves the worker on the per-layer path."""

from __future__ import annotations

import time

import pytest
import torch

import kernels
from engine.api import EngineError, GenerationRequest, SamplingParams
from engine.bench import HYMBA_1_5B, random_weights
from engine.config import HymbaConfig
from engine.generate import Engine
from engine.graph import DecodeGraph
from engine.model import HymbaForCausalLM
from engine.persistent import segments, unsupported
from engine.state import DecodeState
from kernels.persistent_decode import THREADS

MAX_LEN = 3100


def test_runs_of_layers_start_at_a_kv_producer():
    assert segments(HymbaConfig.from_dict(HYMBA_1_5B)) == [(0, 32)]  # every layer, one launch
    # a model longer than a launch's 32 layers: the next run starts at a producer
    config = HymbaConfig.from_dict({**HYMBA_1_5B, "num_hidden_layers": 40, "global_attn_idx": [0],
                                    "kv_reuse_group": []})  # fmt: skip
    assert segments(config) == [(0, 32), (32, 40)]
    config = HymbaConfig.from_dict({**HYMBA_1_5B, "num_hidden_layers": 40, "global_attn_idx": [0],
                                    "kv_reuse_group": [[31, 32]]})  # fmt: skip
    assert segments(config) == [(0, 31), (31, 40)]


def test_the_cpu_stays_on_the_per_layer_path():
    engine = Engine.load("tests/data/conformance/hymba-mirror-12L", device="cpu")
    assert unsupported(engine.model, engine.state) == "the persistent kernel needs a Hopper GPU (sm_90)"
    assert engine.model.persistent is None and engine.decode_path == "PyTorch twins"


def _build(dtype):
    config = HymbaConfig.from_dict(HYMBA_1_5B, "Hymba-1.5B")
    tensors = random_weights(config, torch.device("cuda"), torch.bfloat16)
    tensors = {k: (v.float() if dtype == torch.float32 else v) for k, v in tensors.items()}
    model = HymbaForCausalLM.from_tensors(config, tensors, config.num_memory_tokens + MAX_LEN)
    state = DecodeState(config, MAX_LEN, torch.device("cuda"), dtype)
    model.prefill_meta_tokens(state)
    return model, state


@pytest.fixture(scope="module")
def models():  # the GPU tests' models
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the persistent kernel needs a Hopper GPU")
    bf, ref = _build(torch.bfloat16), _build(torch.float32)
    assert bf[0].use_persistent(bf[1]) is None
    return bf, ref


def _steps(model, state, prompt, tokens, persistent):
    """Logits of decoding `tokens` after `prompt`, and the state after them."""
    saved, model.persistent = model.persistent, persistent
    try:
        state.reset()
        model.prefill(prompt, state)
        out = [model.decode(t.view(1), state).clone() for t in tokens]
    finally:
        model.persistent = saved
    snap = {"ssm": state.ssm.clone(), "conv": state.conv.clone()}
    M, first = state.num_meta, state.num_tokens - len(tokens)  # the slots the decode steps wrote
    for i in state.k:
        positions = range(first, state.num_tokens)
        w = state.window[i]
        slots = list(positions) if w is None else [M + (p - M) % w for p in positions]
        snap[f"k{i}"], snap[f"v{i}"] = state.k[i][:, slots].clone(), state.v[i][:, slots].clone()
    return torch.stack(out), snap


def _err(x, ref):
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("context", [40, 1180, 3000], ids=["short", "wrapped", "three-tiles"])
def test_persistent_matches_triton(models, context):
    (model, state), (model32, state32) = models
    g = torch.Generator(device="cuda").manual_seed(context)
    prompt = torch.randint(3, 32001, (context,), device="cuda", generator=g)
    tokens = torch.randint(3, 32001, (24,), device="cuda", generator=g)
    fast = model.persistent
    got, got_state = _steps(model, state, prompt, tokens, fast)
    assert fast.kernel.err.item() == 0, f"a wait gave up: {fast.kernel.err.item():#x}"
    triton, triton_state = _steps(model, state, prompt, tokens, None)
    ref, ref_state = _steps(model32, state32, prompt, tokens, None)
    e_fast, e_triton = _err(got, ref), _err(triton, ref)
    print(f"\ncontext {context}: logits against fp32, persistent {e_fast:.3e}, Triton {e_triton:.3e}")
    assert e_fast < 3 * e_triton + 1e-3, (e_fast, e_triton)
    for name, want in ref_state.items():
        ef, et = _err(got_state[name], want), _err(triton_state[name], want)
        print(f"  {name}: persistent {ef:.3e}, Triton {et:.3e}")
        assert ef < 3 * et + 1e-3, (name, ef, et)


@pytest.mark.gpu
def test_graph_replays_the_persistent_step(models):
    (model, state), _ = models
    graph = DecodeGraph(model, state)
    assert graph.path == "persistent kernel for layers 0-31", graph.path
    prompt = torch.tensor([1, 415, 296, 90], device="cuda")
    runs = []
    for step in (model.decode, graph.decode):
        state.reset()
        token = model.prefill(prompt, state).argmax()
        logits = []
        for _ in range(30):
            out = step(token.view(1), state)
            logits.append(out.clone())
            token = out.argmax()
        runs.append(torch.stack(logits))
    assert torch.equal(runs[0], runs[1])
    assert graph.persistent.kernel.err.item() == 0


@pytest.mark.gpu
def test_a_launch_missing_blocks_gives_up_in_one_timeout(models):
    """A block that never runs (the launch names one block more than it has) leaves the others waiting for its rows.
    Every wait gives up: the first after 200 ms, the rest at once, not 200 ms each. Nothing traps: a cluster wait that
    gave up must not re-arm its barrier, and no block may leave while a peer can still store into it. The step's h
    is NaN, err says why, and the GPU goes on working."""
    (model, state), _ = models
    fast = model.persistent
    k = fast.kernel
    state.reset()
    model.prefill(torch.tensor([1, 415, 296, 90], device="cuda"), state)
    h, idx = kernels.step_inputs(torch.tensor([5], device="cuda"), model.model.embed_tokens.weight, state.pos,
                                 state.groups, state.num_meta)  # fmt: skip
    indices = state.decode_indices(idx)
    k.begin_step()
    args = k.arguments(h, 0, 32, indices[fast.sliding][0], indices[fast.glob][0], model.cos, model.sin, k.grid + 1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    k.kernel(grid=(k.grid, 1, 1), block=(THREADS, 1, 1), args=args, shared_mem=k.smem)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    print(f"\na launch missing blocks gave up after {elapsed * 1e3:.0f} ms, err {k.err.item():#x}")
    assert k.err.item() != 0 and torch.isnan(h).any()
    assert elapsed < 1.0
    k.err.zero_()
    state.reset()
    model.prefill(torch.tensor([1, 415, 296, 90], device="cuda"), state)
    assert torch.isfinite(model.decode(torch.tensor([5], device="cuda"), state)).all() and k.err.item() == 0


@pytest.mark.gpu
def test_a_wait_that_gives_up_fails_the_request_and_the_worker_falls_back(tmp_path):
    """The kernel's waits give up after 200 ms (its blocks could not all run at once) and set err: the step's output
    is poisoned, the request fails with an EngineError saying why, and the worker decodes on the per-layer path."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the persistent kernel needs a Hopper GPU")
    from tools.random_checkpoint import main as write_checkpoint

    write_checkpoint([str(tmp_path)])
    engine = Engine.load(tmp_path, device="cuda", dtype="bfloat16", max_model_len=1100)
    assert engine.decode_path.startswith("persistent kernel"), engine.decode_path
    request = GenerationRequest((1, 415, 296), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(list(engine.generate(request))) == 8
    engine.model.persistent.kernel.err.fill_(1)  # as a wait that gave up leaves it
    with pytest.raises(EngineError, match="could not run all its blocks at once"):
        list(engine.generate(request))
    assert engine.decode_path.startswith("Triton (switched off)")
    assert len(list(engine.generate(request))) == 8


@pytest.mark.gpu
@pytest.mark.parametrize("context", [40, 1180, 3000], ids=["short", "wrapped", "three-tiles"])
@pytest.mark.parametrize("run", [(0, 1), (1, 3)], ids=["global", "sliding-pair"])
def test_a_run_of_layers_matches_the_triton_layers(models, context, run):
    """The kernel on one global layer (its keys in 1-3 tiles) or one sliding producer-consumer pair, against the
    same layers on the Triton path from the same state: their contribution to h within bf16 rounding."""
    (model, state), _ = models
    fast, (l0, l1) = model.persistent, run
    g = torch.Generator(device="cuda").manual_seed(context)
    state.reset()
    model.prefill(torch.randint(3, 32001, (context,), device="cuda", generator=g), state)
    embed = model.model.embed_tokens.weight
    h0, idx = kernels.step_inputs(torch.tensor([7], device="cuda"), embed, state.pos, state.groups, state.num_meta)
    indices = state.decode_indices(idx)
    saved = (state.conv.clone(), state.ssm.clone(), {i: (k.clone(), state.v[i].clone()) for i, k in state.k.items()})
    want = h0.clone()
    for i in range(l0, l1):
        model.model.layers[i].decode(want, state, indices, model.cos, model.sin)
    state.conv.copy_(saved[0])
    state.ssm.copy_(saved[1])
    for i, (k, v) in saved[2].items():
        state.k[i].copy_(k)
        state.v[i].copy_(v)
    got = h0.clone()
    fast.kernel.begin_step()
    fast.kernel(got, l0, l1, indices[fast.sliding][0], indices[fast.glob][0], model.cos, model.sin)
    err = ((got - want).abs().max() / (want - h0).abs().max()).item()
    print(f"\nlayers {l0}-{l1 - 1} at {context}: the layers' output within {err:.2e} of the Triton path's")
    assert fast.kernel.err.item() == 0
    assert err < 2e-2
