"""How vLLM finds this project's Phi-3 class, and how the vllm backend validates its options (no engine started)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from workers.backend import BackendConfig, create_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loaded_after(imports: str, watched: tuple[str, ...]) -> list[str]:
    code = (f"import sys, importlib\n{imports}\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {watched!r}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return eval(r.stdout.strip().splitlines()[-1])


def test_importing_phi3_model_never_imports_vllm_ray_redis_or_pyarrow():
    """phi3_model knows nothing of Ray, Redis or Parquet, and needs vLLM only in the modules made for it."""
    imports = ("import pkgutil, phi3_model\n"
               "for m in pkgutil.walk_packages(phi3_model.__path__, 'phi3_model.'):\n"
               "    if m.name != 'phi3_model.vllm.model':\n"
               "        importlib.import_module(m.name)")
    assert _loaded_after(imports, ("vllm", "ray", "redis", "pyarrow")) == []


def test_the_request_vocabulary_costs_no_torch():
    """The driver, the queue client and the job config validate requests without loading torch."""
    imports = "import phi3_model.engine.sampling_params, workers.queue.schema, pipeline.config"
    assert _loaded_after(imports, ("torch",)) == []


def test_entry_point_declared_for_vllm_general_plugins():
    from importlib.metadata import entry_points

    from phi3_model.vllm.registry import register
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "phi3_batch"]
    assert eps, "phi3-batch is not installed (scripts/setup.sh installs it editable): no 'phi3_batch' entry point"
    assert eps[0].value == "phi3_model.vllm.registry:register"
    assert eps[0].load() is register


@pytest.mark.vllm
def test_register_is_lazy_idempotent_and_resolves_our_own_class():
    pytest.importorskip("vllm")
    from vllm import ModelRegistry
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.phi3 import Phi3ForCausalLM as VLLMPhi3

    from phi3_model.vllm.registry import ARCH, register
    register()
    first = ModelRegistry.models[ARCH]
    register()
    assert ModelRegistry.models[ARCH] is first  # a second call leaves the registration alone
    assert (first.module_name, first.class_name) == ("phi3_model.vllm.model", "Phi3BatchForCausalLM")  # lazy form

    cls = first.load_model_cls()
    from phi3_model.vllm.model import Phi3BatchForCausalLM
    assert cls is Phi3BatchForCausalLM
    assert not issubclass(cls, (VLLMPhi3, LlamaForCausalLM))
    assert "Phi3ForCausalLM" in ModelRegistry.get_supported_archs()  # vLLM's own class stays available


def test_unknown_option_is_an_error_naming_it_and_the_allowed_ones():
    with pytest.raises(ValueError) as e:
        create_backend(BackendConfig(name="vllm", model="x", options={"gpu_mem": 0.5}))
    msg = str(e.value)
    assert "'gpu_mem'" in msg
    for allowed in ("gpu_memory_utilization", "max_num_seqs", "tensor_parallel_size", "enforce_eager",
                    "kv_cache_space_gib", "max_model_len"):
        assert allowed in msg


def test_option_values_are_validated():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        create_backend(BackendConfig(name="vllm", model="x", options={"gpu_memory_utilization": 1.5}))
    with pytest.raises(ValueError, match="max_num_seqs"):
        create_backend(BackendConfig(name="vllm", model="x", options={"max_num_seqs": 0}))


def test_known_options_pass_through_without_starting_an_engine():
    from workers.vllm_backend import VLLMBackend
    b = create_backend(BackendConfig(name="vllm", model="x", options={
        "gpu_memory_utilization": 0.5, "max_num_seqs": 8, "tensor_parallel_size": 2, "enforce_eager": True,
        "kv_cache_space_gib": 1.5, "max_model_len": 1024}))
    assert isinstance(b, VLLMBackend) and b.engine is None
    assert (b.options.gpu_memory_utilization, b.options.max_num_seqs, b.options.tensor_parallel_size,
            b.options.enforce_eager, b.options.kv_cache_space_gib, b.options.max_model_len) == (0.5, 8, 2, True, 1.5,
                                                                                                 1024)


@pytest.mark.vllm
def test_sampling_params_map_to_vllm_per_request_parameters():
    pytest.importorskip("vllm")
    from vllm.sampling_params import RequestOutputKind

    from phi3_model.engine.sampling_params import SamplingParams
    from workers.vllm_backend import vllm_sampling_params
    sp = vllm_sampling_params(SamplingParams(temperature=0.7, top_k=0, top_p=0.9, seed=11, stop_token_ids=(5, 9),
                                             stop=("###",), min_new_tokens=2, max_new_tokens=40), [5, 9, 400], 400, 30)
    assert (sp.temperature, sp.top_k, sp.top_p, sp.seed) == (0.7, 0, 0.9, 11)  # top_k 0: off in vLLM too
    assert (sp.max_tokens, sp.min_tokens) == (30, 2)  # max_new_tokens capped by the context
    assert sorted(sp.stop_token_ids) == [5, 9, 400] and not sp.ignore_eos  # the model's end token is a stop
    assert not sp.stop and not sp.detokenize  # stop strings are matched on our own decoded text
    assert sp.output_kind == RequestOutputKind.DELTA
    no_eos = vllm_sampling_params(SamplingParams(stop_token_ids=(5,)), [5], 400, 256)
    assert no_eos.stop_token_ids == [5] and no_eos.ignore_eos
