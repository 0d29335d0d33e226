"""Phi-3 configuration: every `config.json` field that changes what the model computes, and named presets.

Reads both rope forms found in the wild: the older top-level `rope_scaling: {type: su|longrope, ...}` with
`rope_theta`, and transformers 5's `rope_parameters: {rope_type, rope_theta, short_factor, ...}`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

# Fields a config.json must carry; everything else has the Phi-3 default.
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class ConfigError(ValueError):
    pass


@dataclass(slots=True)
class RopeScaling:
    """LongRoPE: per-frequency divisors, short for sequences up to `original_max_position_embeddings`, long beyond."""

    short_factor: list[float]
    long_factor: list[float]
    attention_factor: float | None = None  # None: derived from max / original max positions


@dataclass(slots=True)
class Phi3Config:
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    bos_token_id: int = 1
    eos_token_id: int = 32000
    pad_token_id: int = 32000
    tie_word_embeddings: bool = False
    architectures: list[str] = field(default_factory=lambda: ["Phi3ForCausalLM"])

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.rope_scaling is not None:
            want = self.rotary_dim // 2
            for name in ("short_factor", "long_factor"):
                got = len(getattr(self.rope_scaling, name))
                if got != want:
                    raise ConfigError(f"rope_scaling.{name} has {got} entries; rotary_dim/2 = {want} expected")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_factor(self) -> float:
        """Multiplies cos and sin. sqrt(1 + ln(s) / ln(original max)) with s = max / original max, when s > 1."""
        if self.rope_scaling is None:
            return 1.0
        if self.rope_scaling.attention_factor is not None:
            return float(self.rope_scaling.attention_factor)
        scale = self.max_position_embeddings / self.original_max_position_embeddings
        if scale <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(scale) / math.log(self.original_max_position_embeddings))

    def num_parameters(self) -> int:
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        layer = h * (h + 2 * kv) + h * h + 2 * h * i + i * h + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * layer + h + head

    # ---- config.json --------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Phi3Config":
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {d['hidden_act']!r} is not supported; Phi-3 uses 'silu'")
        if d.get("head_dim") is not None and d["head_dim"] * d["num_attention_heads"] != d["hidden_size"]:
            raise ConfigError(f"{source}: head_dim {d['head_dim']} is not hidden_size / num_attention_heads "
                              f"({d['hidden_size']} / {d['num_attention_heads']}); Phi-3 derives it")
        known = {f.name for f in fields(cls)} - {"rope_scaling", "rope_theta"}
        kw = {k: d[k] for k in known if k in d and (d[k] is not None or k == "sliding_window")}
        rope = d.get("rope_parameters") or {}
        legacy = d.get("rope_scaling") or {}
        kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        if "partial_rotary_factor" in rope:  # transformers 5 keeps it here and reads it from here
            kw["partial_rotary_factor"] = rope["partial_rotary_factor"]
        spec = rope if rope.get("rope_type", rope.get("type")) not in (None, "default") else legacy
        kind = spec.get("rope_type", spec.get("type")) if spec else None
        if kind in ("longrope", "su"):
            for k in ("short_factor", "long_factor"):
                v = spec.get(k)
                if not isinstance(v, list) or not all(isinstance(x, (int, float)) for x in v):
                    raise ConfigError(f"{source}: rope scaling 'longrope' needs '{k}' as a list of rotary_dim/2 "
                                      f"numbers, got {v!r}")
            if "original_max_position_embeddings" in spec and "original_max_position_embeddings" not in d:
                kw["original_max_position_embeddings"] = spec["original_max_position_embeddings"]
        elif kind not in (None, "default"):
            raise ConfigError(f"{source}: rope scaling type {kind!r} is not supported; expected none or 'longrope'")
        if "original_max_position_embeddings" not in kw:
            kw["original_max_position_embeddings"] = kw.get("max_position_embeddings", 4096)
        for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(kw.get(k), list):  # generation-style lists: the first is the model's own
                kw[k] = kw[k][0]
        try:
            if kind in ("longrope", "su"):
                kw["rope_scaling"] = RopeScaling(
                    short_factor=[float(x) for x in spec["short_factor"]],
                    long_factor=[float(x) for x in spec["long_factor"]],
                    attention_factor=_attention_factor(spec, kw["original_max_position_embeddings"]),
                )
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("rope_scaling")
        d["model_type"] = "phi3"
        d["hidden_act"] = "silu"
        if self.rope_scaling is not None:
            rs = {"type": "longrope", "short_factor": self.rope_scaling.short_factor,
                  "long_factor": self.rope_scaling.long_factor}
            if self.rope_scaling.attention_factor is not None:
                rs["attention_factor"] = self.rope_scaling.attention_factor
            d["rope_scaling"] = rs
        else:
            d["rope_scaling"] = None
        return d

    @classmethod
    def from_json(cls, path: str) -> "Phi3Config":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"{path}: no config.json (a Hugging Face-format Phi-3 checkpoint directory is expected)")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=path)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2)


def _attention_factor(spec: dict, original_max: int) -> float | None:
    """An explicit attention_factor; else one from an explicit `factor` (as transformers does); else None (derived)."""
    if spec.get("attention_factor") is not None:
        return float(spec["attention_factor"])
    factor = spec.get("factor")
    if factor is None:
        return None
    factor = float(factor)
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))


# Real architectures (Phi-3-mini, 3.82B parameters). The July 2024 128k factor set.
_SHORT_128K = [1.05, 1.05, 1.05, 1.1, 1.1, 1.1, 1.25, 1.25, 1.4, 1.45, 1.55, 1.85, 1.9, 1.9, 1.95, 2.0, 2.05, 2.1,
               2.15, 2.2, 2.25, 2.3, 2.35, 2.4, 2.45, 2.5, 2.55, 2.6, 2.65, 2.7, 2.75, 2.8, 2.85, 2.9, 2.95, 3.0,
               3.05, 3.05, 3.05, 3.05, 3.05, 3.05, 3.05, 3.05, 3.05, 3.05, 3.05, 3.05]
_LONG_128K = [1.0700000524520874, 1.1200000047683716, 1.149999976158142, 1.4199999570846558, 1.5699999332427979,
              1.7999999523162842, 2.129999876022339, 2.129999876022339, 3.009999990463257, 5.910000324249268,
              6.950000286102295, 9.070000648498535, 9.930000305175781, 10.710000038146973, 11.130000114440918,
              14.609999656677246, 15.409998893737793, 19.809999465942383, 37.279998779296875, 38.279998779296875,
              38.599998474121094, 40.38000106811523, 46.20000076293945, 47.27999496459961, 50.5, 50.77000045776367,
              52.36000061035156, 53.38999938964844, 53.97999954223633, 55.45000076293945, 57.18000030517578,
              57.369998931884766, 60.22999954223633, 61.48999786376953, 62.79999923706055, 63.44999694824219,
              64.0, 64.0, 64.0, 64.0, 64.0, 64.0, 64.0, 64.0, 64.0, 64.0, 64.0, 64.0]

PRESETS: dict[str, Phi3Config] = {
    "phi3_mini_4k_instruct_en": Phi3Config(sliding_window=2047),
    "phi3_mini_128k_instruct_en": Phi3Config(
        max_position_embeddings=131072, original_max_position_embeddings=4096, sliding_window=262144,
        rope_scaling=RopeScaling(short_factor=_SHORT_128K, long_factor=_LONG_128K)),
}


def preset_config(name: str) -> Phi3Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; built-in presets: {', '.join(PRESETS)}")
    c = PRESETS[name]
    return Phi3Config.from_dict(c.to_dict(), source=name)  # a fresh copy
