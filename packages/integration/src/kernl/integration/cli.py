"""The ``kernl`` console command: ``kernl bench`` (the main job), ``kernl demo`` and ``kernl rules``."""

import argparse
import sys

from kernl.integration.runtime import select_device


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kernl``; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="kernl", description="kernl: Triton kernels for transformer inference"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="GPU: Bert-base latency of kernl vs HF / CUDA graphs / torch.compile (JSON + chart); "
        "CPU: check a small Bert through the interpreter",
    )
    from kernl.integration.bench.run import add_arguments

    add_arguments(bench)
    commands.add_parser(
        "demo", help="run the layernorm kernels against their references and print the result"
    )
    commands.add_parser("rules", help="list the FX replacement rules: what each matches, what it puts there")
    args = parser.parse_args(argv)
    if args.command == "rules":
        from kernl.integration.rules import describe_rules

        print(describe_rules())
        return 0
    device = select_device()
    if args.command == "bench":
        from kernl.integration.bench.run import run_bench

        return run_bench(args)
    if args.command == "demo":
        from kernl.integration.demo import run_demo

        if device == "cpu":
            print(
                "no CUDA GPU of compute capability 8.0 or newer: kernels run through Triton's interpreter "
                "on the CPU (slow, for checking)"
            )
        return 0 if run_demo(device) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
