"""The serving stream of issue 20 (Bert-base, many (batch, length) shapes, every engine): now
``kernl bench --stream`` (:mod:`kernl.integration.bench.stream`); this script runs that command.

Run: python packages/integration/benchmarks/bench_stream.py [--engines kernl,HF sdpa] [--requests 120]
     [--tokenizer DIR] [--out DIR]
"""

import sys

from kernl.integration.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--stream", *sys.argv[1:]]))
