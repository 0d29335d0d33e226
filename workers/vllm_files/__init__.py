"""The files vLLM reads and writes beside the model, kept where the vllm backend can account for them.

Read: a neutral generation config (generation_config.json here: `{}`), shipped as package data. Why not vLLM's
`generation_config="vllm"`: in vLLM 0.32 it only drops the sampling defaults (ModelConfig.get_diff_sampling_param);
ModelConfig.try_get_generation_config reads the model's own generation_config.json for "auto" and "vllm" alike, and
the InputProcessor adds its `eos_token_id` list to every request's stop ids (SamplingParams
.update_from_generation_config), e.g. Phi-3's <|end|>. `{}` gives no end ids beyond config.eos_token_id and no
sampling defaults.

Written: vLLM puts its ZMQ IPC sockets in VLLM_RPC_BASE_PATH and its engine core's torch.distributed file store
(vllm_dist_*) and inductor cache in the temp directory, and leaves the sockets there even after a clean shutdown.
`run_directory()` gives one engine a directory of its own for all of them, removed when the engine is closed.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading

NEUTRAL_GENERATION_CONFIG = os.path.dirname(os.path.abspath(__file__))
_environ_lock = threading.Lock()


def make_run_directory() -> str:
    return tempfile.mkdtemp(prefix="phi3-vllm-")


def remove_run_directory(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def files_in(path: str):
    """While an engine is built: vLLM's sockets, and everything its spawned engine core process writes to the temp
    directory, go to `path` (the environment is what the spawned process inherits; restored afterwards)."""
    keys = ("TMPDIR", "VLLM_RPC_BASE_PATH")
    with _environ_lock:
        saved = {k: os.environ.get(k) for k in keys}
        os.environ.update({k: path for k in keys})
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
