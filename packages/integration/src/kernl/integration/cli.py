"""The ``kernl`` console command."""

import argparse
import sys

from kernl.integration.runtime import select_device


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kernl``; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="kernl", description="kernl: Triton kernels for transformer inference"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo", help="run the layernorm kernels against their references and print the result"
    )
    args = parser.parse_args(argv)
    device = select_device()
    if args.command == "demo":
        from kernl.integration.demo import run_demo

        if device == "cpu":
            print(
                "no CUDA GPU found: kernels run through Triton's interpreter on the CPU (slow, for checking)"
            )
        return 0 if run_demo(device) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
