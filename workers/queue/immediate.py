"""FOR BENCHMARKS AND QUEUE-MECHANICS CHECKS ONLY: a backend that answers at once, so a run measures the queue's
own ceiling (Redis round trips, parsing, acking), not an engine. It echoes the last prompt token
`max_new_tokens` times and never calls a model."""
from __future__ import annotations

from phi3_model.engine.sampling_params import Completion, SamplingParams

from workers.backend import EngineBackend


class ImmediateBackend(EngineBackend):
    def __init__(self, tokenizer=None, max_model_len: int = 4096):
        self.tokenizer, self.max_model_len = tokenizer, max_model_len

    @classmethod
    def from_dir(cls, path: str | None) -> "ImmediateBackend":
        """With the tokenizer of `path` (a model or tokenizer directory) if it has one; without, requests must
        send prompt_token_ids."""
        from phi3_model.presets import load_tokenizer
        return cls(load_tokenizer(path) if path else None)

    async def start(self) -> None:
        pass

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> Completion:
        ids = [prompt_token_ids[-1]] * params.max_new_tokens
        return Completion(token_ids=ids, text="", finish_reason="length", prompt_tokens=len(prompt_token_ids),
                          completion_tokens=len(ids), request_id=request_id)

    async def close(self) -> None:
        pass
