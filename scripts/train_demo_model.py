"""Train the demo model: a small Phi-3 (this project's architecture and checkpoint format) with its own
SentencePiece tokenizer, fine-tuned with `Phi3CausalLM.fit()` on a synthetic chat task with checkable answers.

    python scripts/train_demo_model.py [--out models/phi3-tiny-chat] [--examples 24000] [--epochs 4]

Tasks (Phi-3 chat format; answers end with <|end|> so generation stops by itself):
    reverse: <word>   -> the word reversed         (3-6 random lowercase letters)
    add: <a> + <b>    -> a + b                     (0 <= a, b < 20)
    sort: <word>      -> its letters sorted        (3-5 random lowercase letters)
Held-out prompts (seed 1234) never appear in training; their greedy accuracy is written to the model's README.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import string
import time

import torch

TASKS = ("reverse", "add", "sort")


def make_example(rng: random.Random, task: str) -> tuple[str, str]:
    if task == "add":
        a, b = rng.randrange(20), rng.randrange(20)
        return f"add: {a} + {b}", str(a + b)
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6 if task == "reverse" else 5)))
    return (f"reverse: {word}", word[::-1]) if task == "reverse" else (f"sort: {word}", "".join(sorted(word)))


def held_out(n: int = 100) -> list[tuple[str, str]]:
    rng = random.Random(1234)
    return [make_example(rng, TASKS[i % len(TASKS)]) for i in range(n)]


def training_set(n: int, exclude: set[str], seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        q, a = make_example(rng, TASKS[len(out) % len(TASKS)])
        if q not in exclude:
            out.append((q, a))
    return out


class CosineDecay:
    """fit() callback: linear warm-up over 5% of the steps, then cosine decay to 5% of the peak rate."""

    def __init__(self, opt, total: int, peak: float):
        self.opt, self.total, self.peak, self.step = opt, total, peak, 0

    def on_train_batch_end(self, batch, logs):
        import math
        self.step += 1
        warm = max(1, self.total // 20)
        t = min(1.0, max(0.0, (self.step - warm) / max(1, self.total - warm)))
        lr = self.peak * min(1.0, self.step / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))
        for g in self.opt.param_groups:
            g["lr"] = lr


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)


def accuracy(lm, pairs, batch: int = 50) -> float:
    ok = 0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        outs = lm.generate([chat_prompt(lm.tokenizer, q) for q, _ in chunk], max_length=48, strip_prompt=True)
        ok += sum(o.removesuffix("<|end|>").strip() == a for o, (_, a) in zip(outs, chunk))
    return ok / len(pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/phi3-tiny-chat")
    ap.add_argument("--examples", type=int, default=24000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    from phi3_model.causal_lm import Phi3CausalLM, Phi3CausalLMPreprocessor
    from phi3_model.checkpoint import build_model
    from phi3_model.config import Phi3Config
    from phi3_model.tokenizer import train_tokenizer

    test = held_out()
    train = training_set(a.examples, {q for q, _ in test})
    tmp = a.out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    corpus = [f"{q}\n{r}" for q, r in train[:5000]] + list(string.ascii_letters + string.digits + "+:")
    tok = train_tokenizer(corpus, tmp, vocab_size=320, compact_ids=True)
    vocab = -(-tok.vocab_size // 64) * 64
    config = Phi3Config(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        original_max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = build_model(config, torch.float32, "cpu", seed=0)
    lm = Phi3CausalLM(model, Phi3CausalLMPreprocessor(tok, sequence_length=64))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
    steps = a.epochs * -(-len(train) // a.batch_size)
    lm.compile(sampler="greedy", optimizer=opt)
    pairs = {"prompts": [chat_prompt(tok, q) for q, _ in train], "responses": [r + "<|end|>" for _, r in train]}
    t0 = time.time()
    hist = lm.fit(pairs, batch_size=a.batch_size, epochs=a.epochs, callbacks=[CosineDecay(opt, steps, a.lr)])
    minutes = (time.time() - t0) / 60
    lm.save_to_preset(tmp, dtype="bfloat16")
    reloaded = Phi3CausalLM.from_preset(tmp)  # measure what is shipped: bf16 weights read back
    reloaded.compile(sampler="greedy")
    acc = accuracy(reloaded, test)
    per_task = {t: accuracy(reloaded, [p for p in test if p[0].startswith(t)]) for t in TASKS}
    note = {"held_out_accuracy": acc, "per_task": per_task, "held_out_prompts": len(test),
            "train_examples": len(train), "epochs": a.epochs, "final_loss": hist.history["loss"][-1],
            "train_minutes": round(minutes, 1), "parameters": config.num_parameters()}
    with open(os.path.join(tmp, "training.json"), "w") as f:
        json.dump(note, f, indent=2)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(f"# phi3-tiny-chat\n\nA {config.num_parameters() / 1e6:.2f}M-parameter Phi-3 trained by "
                f"`scripts/train_demo_model.py` with `Phi3CausalLM.fit()` ({len(train)} examples, {a.epochs} "
                f"epochs, {minutes:.1f} min on CPU). Tasks: `reverse: <word>`, `add: <a> + <b>`, `sort: <word>` in "
                f"the Phi-3 chat format; answers end with `<|end|>`.\n\nGreedy accuracy on {len(test)} held-out "
                f"prompts (bf16 weights as shipped): {acc:.0%} ({', '.join(f'{k} {v:.0%}' for k, v in per_task.items())})."
                f"\n")
    shutil.rmtree(a.out, ignore_errors=True)
    os.replace(tmp, a.out)
    print(json.dumps(note, indent=2))


if __name__ == "__main__":
    main()
