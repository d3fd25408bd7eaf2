"""vllm-kimi-neuron: serve Kimi-K2 on AWS Trainium2 through vLLM, vllm-neuron and NxDI."""

__version__ = "0.1.0"
