"""Kimi-K2 / DeepSeek-V3 math as plain PyTorch functions over weight tensors.

One module per concept (norm, rope, mla, router, moe). The functions are shape-generic and
traceable: no data-dependent Python control flow, no ``.item()``, no numpy, so the CPU reference
(:mod:`vllm_kimi_neuron.reference`) and the Neuron model can run the same code. The one exception
is :func:`moe.routed_experts`, the CPU reference's sparse expert dispatch, which says so.
"""
