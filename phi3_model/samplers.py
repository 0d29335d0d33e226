"""KerasHub-style samplers, chosen with `Phi3CausalLM.compile(sampler=...)`, mapped onto SamplingParams fields.

Defaults follow keras_hub.samplers: top_k k=5, top_p p=0.1, temperature 1, unseeded. A seed applies to every row
of a batch alike, so a row's output does not depend on its position in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampler:
    temperature: float = 1.0
    seed: int | None = None

    def params(self) -> dict:
        return {"temperature": self.temperature, "seed": self.seed}


@dataclass(frozen=True)
class GreedySampler(Sampler):
    def params(self) -> dict:
        return {"temperature": 0.0}


@dataclass(frozen=True)
class RandomSampler(Sampler):
    pass


@dataclass(frozen=True)
class TopKSampler(Sampler):
    k: int = 5

    def params(self) -> dict:
        return {**super().params(), "top_k": self.k}


@dataclass(frozen=True)
class TopPSampler(Sampler):
    p: float = 0.1
    k: int | None = None

    def params(self) -> dict:
        return {**super().params(), "top_p": self.p, "top_k": self.k or 0}


NAMES = {"greedy": GreedySampler, "random": RandomSampler, "top_k": TopKSampler, "top_p": TopPSampler}
UNSUPPORTED = ("beam", "contrastive")


def get_sampler(sampler) -> Sampler:
    if isinstance(sampler, Sampler):
        return sampler
    if isinstance(sampler, str) and sampler in NAMES:
        return NAMES[sampler]()
    if isinstance(sampler, str) and sampler in UNSUPPORTED:
        raise ValueError(f"sampler {sampler!r} is not supported by this engine (it decodes one sequence per "
                         f"request); use one of {', '.join(NAMES)}")
    raise ValueError(f"sampler {sampler!r} is unknown; expected one of {', '.join(NAMES)} or a Sampler object")
