"""This project's Phi-3 inside vLLM: the model class vLLM runs (`model`), this project's tokenizer as a vLLM
tokenizer (`tokenizer`), and their registration (`registry.register`, the `vllm.general_plugins` entry point).

The only part of phi3_model that needs vLLM: `registry` imports nothing of vLLM until `register()` is called (by
vLLM's own processes, through the entry point); `model` and `tokenizer` are imported by vLLM alone.
"""
