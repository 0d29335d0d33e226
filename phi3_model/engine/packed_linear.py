"""A linear layer with its weight reordered once into oneDNN's blocked layout (CPU, fp32 or bf16).

Decode steps multiply a few rows by the [vocab, hidden] lm_head: with the plain layout the CPU GEMM re-packs the
whole weight on every call and the step pays about twice the weight's memory traffic (measured: 32 ms vs 16 ms
for 16 rows of a 32064 x 512 head on one core); the decoder's own linear layers gain 10-40% at 8 to 1024 rows, in
fp32 and in bf16 (bench model, one core). Packing costs one extra copy of the weight (for Phi-3-mini's lm_head in
fp32, 394 MB; EngineConfig.packed_weights says which layers). The packed copy is rebuilt whenever the weight
changes (fit() between generate calls), checked by the tensor's version counter. Anywhere else (CUDA, other
dtypes, no oneDNN) the plain linear runs.
"""
from __future__ import annotations

import torch
from torch import nn


class PackedLinear:
    def __init__(self, linear: nn.Linear, rows_hint: int = 16):
        self.linear = linear
        self.rows_hint = rows_hint
        w = linear.weight
        self.enabled = (w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16) and linear.bias is None
                        and torch.backends.mkldnn.is_available()
                        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
        self._packed = None
        self._key = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.linear(x)
        w = self.linear.weight
        key = (w.data_ptr(), w._version)
        if key != self._key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), self.rows_hint)
            self._key = key
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._packed, None, "none", [], "")
