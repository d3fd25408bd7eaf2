"""Serving benchmark, A/B comparison and load test over the OpenAI API (also `kimi-neuron bench`).

    python benchmarks/serve.py --url http://127.0.0.1:8000 --concurrency 1,8,32,64 \\
        --input-len 1024 --output-len 256 --out results/tp64
    python benchmarks/serve.py --serve MODEL_DIR --compare-without-plugin kimi_neuron --concurrency 1,4,16
    python benchmarks/serve.py --url http://127.0.0.1:8000 --load-test --streams 64 --duration 600

Writes results.json, results.md and PNG plots under --out; the logic lives in vllm_kimi_neuron/bench.py.
See benchmarks/README.md for the metrics and the trn2.48xlarge procedure.
"""

import sys

from vllm_kimi_neuron.bench import main

if __name__ == "__main__":
    sys.exit(main())
