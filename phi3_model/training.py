"""`fit()` for Phi3CausalLM: next-token cross-entropy with padding (and prompts, for pairs) masked, AdamW.

Inputs, in the spirit of KerasHub's CausalLMPreprocessor:
- a list of strings: each becomes `<s> text <|endoftext|>`, every real token predicted;
- prompt/response pairs (`{"prompts": [...], "responses": [...]}` or a list of `(prompt, response)`): the loss
  covers only the response tokens (and the closing end token);
- with no preprocessor, backbone inputs `{"token_ids", "padding_mask"}` [B, T] (y: labels [B, T] or None for the
  inputs shifted; `sample_weight` optional).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class History:
    history: dict[str, list[float]] = field(default_factory=lambda: {"loss": []})


@dataclass
class Example:
    token_ids: list[int]
    loss_from: int  # first position whose next-token prediction counts


def examples_from(x, tokenizer, sequence_length: int) -> list[Example]:
    def encode_pair(prompt: str, response: str) -> Example:
        p = tokenizer.encode(prompt, add_bos=True)
        r = tokenizer.encode(response) + [tokenizer.eos_token_id]
        return Example((p + r)[:sequence_length], len(p) - 1)

    if isinstance(x, dict) and "prompts" in x:
        return [encode_pair(p, r) for p, r in zip(x["prompts"], x["responses"], strict=True)]
    out = []
    for i, item in enumerate(x):
        if isinstance(item, str):
            ids = tokenizer.encode(item, add_bos=True) + [tokenizer.eos_token_id]
            out.append(Example(ids[:sequence_length], 0))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out.append(encode_pair(*item))
        else:
            raise TypeError(f"fit() example {i}: expected a string or a (prompt, response) pair, "
                            f"got {type(item).__name__}")
    return out


def collate(batch: list[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> token_ids, padding_mask [B, T] and loss weights [B, T-1] (position t predicts token t+1)."""
    T = max(len(e.token_ids) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.bool)
    weight = torch.zeros((len(batch), T - 1))
    for b, e in enumerate(batch):
        n = len(e.token_ids)
        ids[b, :n] = torch.tensor(e.token_ids)
        mask[b, :n] = True
        weight[b, e.loss_from:n - 1] = 1.0
    return ids.to(device), mask.to(device), weight.to(device)


def causal_lm_loss(model, ids, mask, weight) -> torch.Tensor:
    """Mean next-token cross-entropy over weighted positions. ids/mask [B, T], weight [B, T-1]."""
    use_amp = model.device.type == "cuda" and model.dtype == torch.float32
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
        logits = model.dense_logits(ids, mask)[:, :-1]  # [B, T-1, V]
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    w = weight.reshape(-1)
    return (nll * w).sum() / w.sum().clamp(min=1.0)


def make_optimizer(model, optimizer="adamw", learning_rate: float = 1e-3, weight_decay: float = 0.01):
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    params = list(model.parameters())
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, betas=(0.9, 0.95))
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=learning_rate)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=learning_rate)
    raise ValueError(f"optimizer {optimizer!r} is unknown; expected 'adamw', 'adam', 'sgd' or a torch optimizer")


def _call(callbacks, hook: str, *args):
    for cb in callbacks or ():
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


def fit(lm, x, y=None, batch_size: int = 8, epochs: int = 1, validation_data=None, callbacks=None,
        shuffle: bool = True, seed: int = 0, verbose: bool = True, sample_weight=None) -> History:
    from tqdm.auto import tqdm

    model = lm.backbone
    if lm.preprocessor is not None:
        seq_len = lm.preprocessor.sequence_length
        data = examples_from(x, lm.tokenizer, seq_len)
        val = examples_from(validation_data, lm.tokenizer, seq_len) if validation_data is not None else None
        pad = lm.tokenizer.pad_token_id
    else:
        data, val, pad = _backbone_examples(x, y, sample_weight), None, 0
    for p in model.parameters():
        p.requires_grad_(True)
    opt = make_optimizer(model, *lm.optimizer)
    rng = random.Random(seed)
    hist = History()
    if val is not None:
        hist.history["val_loss"] = []
    steps = math.ceil(len(data) / batch_size)
    model.train()
    try:
        for epoch in range(epochs):
            order = list(range(len(data)))
            if shuffle:
                rng.shuffle(order)
            bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{epochs}", disable=not verbose, leave=False)
            total = 0.0
            for s in bar:
                batch = [data[i] for i in order[s * batch_size:(s + 1) * batch_size]]
                loss = causal_lm_loss(model, *collate(batch, pad, model.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                total += loss.item()
                bar.set_postfix(loss=f"{total / (s + 1):.4f}")
                _call(callbacks, "on_train_batch_end", s, {"loss": loss.item()})
            logs = {"loss": total / steps}
            hist.history["loss"].append(logs["loss"])
            if val is not None:
                logs["val_loss"] = evaluate(model, val, batch_size, pad)
                hist.history["val_loss"].append(logs["val_loss"])
            if verbose:
                print(f"epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))
            _call(callbacks, "on_epoch_end", epoch, logs)
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        lm.reset_engine()  # cached KV blocks were computed with the old weights
    return hist


@torch.no_grad()
def evaluate(model, data: list[Example], batch_size: int, pad: int) -> float:
    was = model.training
    model.eval()
    total, count = 0.0, 0.0
    for s in range(0, len(data), batch_size):
        ids, mask, w = collate(data[s:s + batch_size], pad, model.device)
        total += causal_lm_loss(model, ids, mask, w).item() * w.sum().item()
        count += w.sum().item()
    model.train(was)
    return total / max(count, 1.0)


def _backbone_examples(x, y, sample_weight) -> list[Example]:
    if not isinstance(x, dict) or "token_ids" not in x:
        raise TypeError("without a preprocessor, fit() takes backbone inputs {'token_ids', 'padding_mask'}")
    if y is not None or sample_weight is not None:
        raise ValueError("with backbone inputs, fit() predicts token_ids shifted by one; pass y=None and mask "
                         "unwanted tokens with padding_mask")
    ids = torch.as_tensor(x["token_ids"]).tolist()
    mask = torch.as_tensor(x.get("padding_mask", torch.ones(len(ids), len(ids[0])))).bool().tolist()
    return [Example([t for t, m in zip(row, mrow) if m], 0) for row, mrow in zip(ids, mask)]
