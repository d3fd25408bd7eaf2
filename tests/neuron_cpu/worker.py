"""One rank of a Neuron-on-CPU run (started by ``torchrun`` from the tests, or directly at tp 1).

    worker.py shard  MODEL CONVERTED COMPILED LAYOUT SEQS LEN          (one process, no torchrun)
    worker.py run    MODEL CONVERTED COMPILED LAYOUT SEQS LEN SCRIPT OUT
    worker.py dtypes MODEL CONVERTED COMPILED LAYOUT SEQS LEN OUT      (one process)

``shard`` does what NxDI's compile does besides tracing (neuron_config.json, NxD's pre-sharding);
``dtypes`` builds every submodel with the planner's own config (bf16, no CPU changes) through
``DecoderModelInstance.load_module()`` and writes each parameter's and buffer's dtype as JSON;
``run`` loads this rank's shard into the device-path modules and runs the script through NxDI's
``forward``; rank 0 writes the logits and what it observed to ``OUT`` (a torch file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nxdi_cpu
import torch


def main(argv: list[str]) -> None:
    command, model, converted, compiled, layout_name, seqs, length = argv[:7]
    nxdi_cpu.set_host_env()
    layout = nxdi_cpu.LAYOUTS[layout_name]
    nc, patches = nxdi_cpu.neuron_config(Path(model), Path(converted), layout, int(seqs), int(length),
                                         cpu_changes=command != "dtypes")
    from vllm_kimi_neuron.neuron.hooks import install_plan_patches

    install_plan_patches(patches)  # as the plugin does in the engine process
    nxdi_cpu.install_cpu_shims()
    app = nxdi_cpu.build_application(Path(model), nc)
    if command == "shard":
        nxdi_cpu.shard_like_compile(app, Path(compiled))
        return
    if command == "dtypes":
        nxdi_cpu.init_ranks(nc)
        Path(argv[7]).write_text(json.dumps(nxdi_cpu.device_dtypes(app), indent=1))
        return
    script = nxdi_cpu.Script.from_json(Path(argv[7]).read_text())
    rank = nxdi_cpu.init_ranks(nc)
    missing = nxdi_cpu.load_rank(app, Path(compiled), rank)
    logits = nxdi_cpu.run_script(app, script)
    if rank == 0:
        torch.save({"logits": logits, "missing": missing, "patches": patches}, argv[8])


if __name__ == "__main__":
    main(sys.argv[1:])
