"""Where a model comes from: a built-in preset name, a local directory, or `hf://owner/name` in the local cache."""
from __future__ import annotations

import os

from .config import PRESETS, Phi3Config, preset_config

HF_REPOS = {
    "phi3_mini_4k_instruct_en": "microsoft/Phi-3-mini-4k-instruct",
    "phi3_mini_128k_instruct_en": "microsoft/Phi-3-mini-128k-instruct",
}


class PresetError(ValueError):
    pass


def hf_cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.path.join(home, "hub")


def hf_snapshot(repo: str) -> str | None:
    """The cached snapshot directory of `owner/name` (the revision refs/main points at, else any), or None."""
    root = os.path.join(hf_cache_dir(), "models--" + repo.replace("/", "--"))
    snaps = os.path.join(root, "snapshots")
    if not os.path.isdir(snaps):
        return None
    ref = os.path.join(root, "refs", "main")
    if os.path.exists(ref):
        rev = open(ref).read().strip()
        if os.path.isdir(os.path.join(snaps, rev)):
            return os.path.join(snaps, rev)
    revs = sorted(os.listdir(snaps))
    return os.path.join(snaps, revs[-1]) if revs else None


def resolve(preset: str, need_files: bool = True) -> tuple[Phi3Config, str | None]:
    """-> (config, checkpoint directory or None when only the architecture is known)."""
    if preset.startswith("kaggle://"):
        raise PresetError(f"{preset}: Kaggle handles are not supported (no network access to Kaggle here); use a "
                          f"local directory, hf://owner/name from the local Hugging Face cache, or a built-in preset "
                          f"({', '.join(PRESETS)})")
    if preset.startswith("hf://"):
        repo = preset[len("hf://"):].strip("/")
        snap = hf_snapshot(repo)
        if snap is None:
            raise PresetError(f"{preset}: not in the local Hugging Face cache; put the model's files (config.json, "
                              f"*.safetensors, tokenizer.model) under {hf_cache_dir()}/models--"
                              f"{repo.replace('/', '--')}/snapshots/<revision>/ (e.g. `huggingface-cli download "
                              f"{repo}` on a machine with network access, then copy the cache), or pass a local "
                              f"directory")
        return Phi3Config.from_json(snap), snap
    if preset in PRESETS:
        snap = hf_snapshot(HF_REPOS[preset])
        if snap is not None:
            return Phi3Config.from_json(snap), snap
        if need_files:
            raise PresetError(f"{preset}: built-in architecture known, but its weights are not on this machine; "
                              f"put the Hugging Face checkpoint {HF_REPOS[preset]} in the local cache "
                              f"({hf_cache_dir()}), pass a local directory, or use load_weights=False for random "
                              f"weights")
        return preset_config(preset), None
    if os.path.isdir(preset):
        return Phi3Config.from_json(preset), preset
    raise PresetError(f"{preset!r} is not a built-in preset ({', '.join(PRESETS)}), a local directory, "
                      f"or an hf://owner/name handle")


def pick_device(device: str = "auto"):
    import torch
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX tiles), as torch's own CPU checks say, else
    as /proc/cpuinfo's flags say. Without them bf16 matmuls are emulated and slower than fp32."""
    import torch
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(dtype, device):
    import torch
    from .checkpoint import resolve_dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return resolve_dtype(dtype)


def load_tokenizer(directory: str | None):
    if directory is None or not os.path.exists(os.path.join(directory, "tokenizer.model")):
        return None
    from .tokenizer import Phi3Tokenizer
    return Phi3Tokenizer.from_dir(directory)


def load_model_and_tokenizer(preset: str, dtype="auto", device="auto", load_weights: bool = True, seed: int = 0):
    from . import seam
    from .checkpoint import build_model
    seam.before_load()
    config, directory = resolve(preset, need_files=load_weights)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    model = build_model(config, dt, dev, load_weights_from=directory if load_weights else None, seed=seed)
    return model, load_tokenizer(directory)
