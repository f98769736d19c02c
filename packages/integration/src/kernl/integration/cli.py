"""The ``kernl`` console command: ``kernl bench`` (the main job), ``kernl demo`` and ``kernl rules``."""

import argparse
import os
import subprocess
import sys

from kernl.integration.runtime import select_device

# What each command runs on the CPU, as a module a fresh Python can run (see main; ``kernl bench``'s
# depends on its options: bench.run.cpu_plan).
CPU_MODULES = {"bench": "kernl.integration.bench.cpu_check", "demo": "kernl.integration.demo"}
CPU_PLANS = {
    "bench": "no speed figures; checking a small embedded Bert through Triton's interpreter on the CPU",
    "demo": "the kernels run through Triton's interpreter on the CPU (slow, for checking)",
}


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's own parser."""
    from kernl.integration.bench.run import add_arguments

    parser = argparse.ArgumentParser(
        prog="kernl", description="kernl: Triton kernels for transformer inference"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="GPU: Bert-base latency of kernl vs HF / CUDA graphs / torch.compile (JSON + chart); "
        "CPU: check a small Bert through the interpreter",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(bench)
    demo = commands.add_parser(
        "demo", help="run the layernorm kernels against their references and print the result"
    )
    rules = commands.add_parser(
        "rules", help="list the FX replacement rules: what each matches, what it puts there"
    )
    return parser, {"bench": bench, "demo": demo, "rules": rules}


def cpu_reason() -> str:
    """Why kernl's kernels cannot run on this machine's GPU: there is none, or it predates Ampere."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    return f"the GPU has compute capability {major}.{minor}; kernl's kernels need 8.0 (Ampere) or newer"


def _compiled_kernels_imported() -> bool:
    """Whether a kernl kernel module already holds compiled (not interpreted) Triton kernels: the
    environment variable alone cannot tell, since an earlier CPU command of this process set it after
    the kernels were defined."""
    from triton.runtime.jit import JITFunction

    modules = [m for name, m in list(sys.modules.items()) if name.startswith("kernl.") and m is not None]
    return any(isinstance(value, JITFunction) for m in modules for value in vars(m).values())


def run_in_fresh_python(module: str, *arguments: str) -> int:
    """``python -m <module> <arguments>`` with Triton's interpreter on and no GPU visible, its output
    passed through line by line; returns its exit code."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", module, *arguments]
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as child:
        for line in child.stdout:
            print(line, end="", flush=True)
    return child.returncode


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kernl``; returns the process exit code."""
    parser, command_parsers = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's own usage, not the top level's
        command_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "bench":
        from kernl.integration.bench.run import check_mode_options

        check_mode_options(command_parsers["bench"], args)
    if args.command == "rules":
        from kernl.integration.rules import describe_rules

        print(describe_rules())
        return 0
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    device = select_device()
    if device == "cpu":
        plan, command = CPU_PLANS[args.command], [CPU_MODULES[args.command]]
        if args.command == "bench":
            from kernl.integration.bench.run import cpu_plan, ignored_options_note

            plan, command = cpu_plan(args)
        print(f"{cpu_reason()}: {plan}", flush=True)
        if args.command == "bench":
            note = ignored_options_note(args)
            if note:
                print(note, flush=True)
        if command is None:
            return 1
        # Triton makes a kernel compiled or interpreted when it is defined, as kernl's kernel modules are
        # imported: a process that imported triton without the interpreter cannot run them on the CPU.
        if "triton" in sys.modules and (not interpreting or _compiled_kernels_imported()):
            return run_in_fresh_python(*command)
    if args.command == "bench":
        from kernl.integration.bench.run import run_bench

        return run_bench(args, device)
    from kernl.integration.demo import run_demo

    return 0 if run_demo(device) else 1


if __name__ == "__main__":
    sys.exit(main())
