"""vLLM 0.16 and vllm-neuron 0.5.0 building their configuration for a Kimi-K2 serve, in one process.

    vllm_worker.py MODEL OUT [ENGINE_ARGS_JSON] [--through-get-neuron-model]

``vllm serve MODEL ...`` as ``EngineArgs(**ENGINE_ARGS_JSON).create_engine_config()``: vLLM loads its
general plugins (ours among them, through its entry point, unless ``VLLM_PLUGINS`` says otherwise)
and runs vllm-neuron's ``NeuronPlatform.check_and_update_config``. The one stand-in: vllm-neuron's
platform plugin activates only where ``/dev/neuron*`` exists, so its platform class is set as vLLM's
current platform by hand. Writes what vLLM built as JSON to ``OUT``.

With ``--through-get-neuron-model``, vllm-neuron's own ``get_neuron_model`` (wrapped by this package)
then runs on those config objects: our planner, the conversion, the artifact choice, vllm-neuron's
default config, override merge and validation, and its loader building NxDI's config classes, up to
``_compile_and_load_model``, which needs neuronx-cc and a device; a stand-in there records the
NxDI config it was handed instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


class CompileStandIn(Exception):
    """Raised where vllm-neuron would start neuronx-cc: nothing can compile here."""


def main(model: str, out: str, engine_args: dict[str, Any], through_loader: bool) -> None:
    import vllm.platforms
    from vllm_neuron.platform import NeuronPlatform

    vllm.platforms.current_platform = NeuronPlatform()  # stand-in for the device check (see above)
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=model, **engine_args)
    config = args.create_engine_config()
    result: dict[str, Any] = {
        "enable_prefix_caching": config.cache_config.enable_prefix_caching,
        "enable_chunked_prefill": config.scheduler_config.enable_chunked_prefill,
        "block_size": config.cache_config.block_size,
        "max_num_seqs": config.scheduler_config.max_num_seqs,
        "max_model_len": config.model_config.max_model_len,
        "scheduler_cls": str(config.scheduler_config.scheduler_cls),
    }
    if through_loader:
        from vllm_neuron.worker import neuronx_distributed_model_loader as loader

        recorded: dict[str, Any] = {}

        def compile_and_load(self: Any, model_path: str, cls: type, nxdi_config: Any, path: str) -> None:
            recorded.update(cls=f"{cls.__module__}.{cls.__qualname__}", compiled_path=str(path),
                            neuron_config=json.loads(nxdi_config.to_json_string())["neuron_config"])
            raise CompileStandIn

        loader.NeuronCausalLM._compile_and_load_model = compile_and_load
        assert getattr(loader.get_neuron_model, "kimi_neuron_wrapped", False), "our loader patch is not in"
        from vllm.config import set_current_vllm_config

        try:
            with set_current_vllm_config(config):  # as vllm-neuron's model runner calls it
                loader.get_neuron_model(config.model_config, config.cache_config, config.parallel_config,
                                        config.scheduler_config, None, None, config.additional_config)
        except CompileStandIn:
            pass
        result["loader"] = recorded
    Path(out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    rest = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(rest[0], rest[1], json.loads(rest[2]) if len(rest) > 2 else {},
         "--through-get-neuron-model" in flags)
