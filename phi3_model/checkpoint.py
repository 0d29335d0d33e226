"""Hugging Face-format Phi-3 checkpoints: safetensors only, loaded tensor by tensor onto a meta-built model.

Peak host memory is the model in the target dtype plus one tensor in flight: safetensors files are memory-mapped
and each tensor is cast and assigned on its own. Pickle formats are refused, never opened.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import Phi3Config
from .model import Phi3ForCausalLM

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "consolidated.00.pth")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(ValueError):
    pass


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def weight_files(directory: str) -> dict[str, str]:
    """Tensor name -> file path, from the index or the single file. Errors name what is missing."""
    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        out = {}
        for name, fname in weight_map.items():
            path = os.path.join(directory, fname)
            if not os.path.exists(path):
                raise CheckpointError(f"{index}: shard {fname} (holding {name}) is missing from {directory}")
            out[name] = path
        return out
    single = os.path.join(directory, SINGLE)
    if os.path.exists(single):
        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}
    pickled = [p for p in PICKLED if os.path.exists(os.path.join(directory, p))]
    if pickled:
        raise CheckpointError(
            f"{os.path.join(directory, pickled[0])}: pickled checkpoints are refused (unpickling runs arbitrary "
            f"code); convert it to safetensors (e.g. transformers' save_pretrained(..., safe_serialization=True))")
    raise CheckpointError(f"{directory}: no {SINGLE} or {INDEX} found")


def build_model(config: Phi3Config, dtype=torch.float32, device="cpu", load_weights_from: str | None = None,
                seed: int | None = None) -> Phi3ForCausalLM:
    """Build on the meta device, then either load every tensor from a checkpoint or initialise randomly in place."""
    dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    if load_weights_from is not None:
        load_into(model, load_weights_from, dtype, device)
    else:
        model.to(dtype)  # still on meta: allocation below happens once, in the target dtype
        model.to_empty(device=device)
        _random_init(model, 0 if seed is None else seed)
    _reset_buffers(model, device)
    return model.eval()


def _random_init(model: Phi3ForCausalLM, seed: int) -> None:
    """Norms 1, the rest N(0, 0.02) (HF's initializer_range), drawn in place in the target dtype.

    One generator per tensor, seeded from `seed`, so tensors fill in parallel (3.8B values: ~30 s of CPU) and the
    result does not depend on the thread count.
    """
    params = list(model.named_parameters())
    seeds = torch.randint(2**62, (len(params),), generator=torch.Generator().manual_seed(seed)).tolist()

    @torch.no_grad()
    def fill(i: int):
        name, p = params[i]
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=torch.Generator(device=p.device).manual_seed(seeds[i]))

    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:  # ATen releases the GIL
        list(pool.map(fill, range(len(params))))


def _reset_buffers(model: Phi3ForCausalLM, device):
    rotary = model.model.rotary
    fresh = type(rotary)(model.config)
    rotary.inv_freq_short = fresh.inv_freq_short.to(device)
    rotary.inv_freq_long = fresh.inv_freq_long.to(device)


def load_into(model: Phi3ForCausalLM, directory: str, dtype: torch.dtype, device) -> None:
    files = weight_files(directory)
    params = dict(model.named_parameters())
    if model.config.tie_word_embeddings:
        params.pop("lm_head.weight", None)
        files.pop("lm_head.weight", None)
    missing = sorted(set(params) - set(files))
    if missing:
        source = os.path.join(directory, INDEX if os.path.exists(os.path.join(directory, INDEX)) else SINGLE)
        raise CheckpointError(f"{source}: missing tensor(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    unexpected = sorted(n for n in set(files) - set(params) if not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise CheckpointError(f"{files[unexpected[0]]}: unexpected tensor(s) {', '.join(unexpected[:5])} "
                              f"(not part of a Phi-3 model with this config)")
    by_file: dict[str, list[str]] = {}
    for name in params:
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in names:
                t = f.get_tensor(name)
                want = tuple(params[name].shape)
                if tuple(t.shape) != want:
                    raise CheckpointError(f"{path}: tensor {name} has shape {tuple(t.shape)}, "
                                          f"config expects {want}")
                _assign(model, name, torch.nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def _assign(model, name: str, value):
    *path, leaf = name.split(".")
    mod = model
    for p in path:
        mod = getattr(mod, p)
    setattr(mod, leaf, value)


def load_checkpoint(directory: str, dtype=torch.float32, device="cpu") -> Phi3ForCausalLM:
    config = Phi3Config.from_json(directory)
    return build_model(config, dtype, device, load_weights_from=directory)


def save_checkpoint(model: Phi3ForCausalLM, directory: str, dtype=None, max_shard_bytes: int | None = None) -> None:
    """Write config.json and safetensors (sharded with an index when larger than max_shard_bytes)."""
    os.makedirs(directory, exist_ok=True)
    model.config.save(directory)
    dtype = resolve_dtype(dtype) if dtype is not None else None
    params = {name: p for name, p in model.state_dict().items()
              if not (model.config.tie_word_embeddings and name == "lm_head.weight")}

    def stored(names):  # cast shard by shard: never a second copy of the whole model
        return {n: params[n].detach().to("cpu", dtype or params[n].dtype).contiguous() for n in names}

    def nbytes(name):
        return params[name].numel() * (dtype or params[name].dtype).itemsize

    stale = os.path.join(directory, SINGLE if max_shard_bytes is not None else INDEX)
    if os.path.exists(stale):  # the loader prefers the index: never leave the other form behind
        os.remove(stale)
    if max_shard_bytes is None:
        save_file(stored(params), os.path.join(directory, SINGLE), metadata={"format": "pt"})
        return
    shards: list[list[str]] = [[]]
    size = 0
    for name in params:
        if shards[-1] and size + nbytes(name) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes(name)
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(stored(names), os.path.join(directory, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    total = sum(nbytes(n) for n in params)
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
