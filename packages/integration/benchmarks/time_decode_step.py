"""Wall-clock time of one decoder step of flan-T5-base shapes on kernl's decode loop (CUDA graphs), with
every rule or with some left out, to measure what a rule buys.

fp16, greedy, 128 prompt tokens. Two ``generate()`` lengths, 8 and 40 new tokens (``min_new_tokens`` holds
them), are timed (median wall clock, host work included); their difference over 32 is the time of one
step: the encoder, the prefill and the first chunk's host work cancel out.
Run: python packages/integration/benchmarks/time_decode_step.py [--batch 1] [--without cache_write_attention]
"""

import argparse

import torch
from bench_t5 import flan_t5_base

from kernl.integration import optimize_model, rules
from kernl.integration.bench.gpu import inputs, wall_clock_ms

SHORT, LONG = 8, 40


def main(batch: int, without: list[str]) -> None:
    unknown = set(without) - {rule.name for rule in rules.RULES}
    if unknown:
        raise SystemExit(f"no rule named {', '.join(sorted(unknown))}")
    rules.RULES[:] = [rule for rule in rules.RULES if rule.name not in without]  # the list the backend reads
    model = flan_t5_base()
    report = optimize_model(model)
    ids, mask = inputs(batch, 128, model.config.vocab_size)

    def generate(new_tokens: int):
        with torch.inference_mode():
            return model.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
            )

    for new_tokens in (SHORT, LONG, SHORT, LONG):  # compile and capture every graph first
        generate(new_tokens)
    short, long = (wall_clock_ms(lambda n=n: generate(n), budget_s=3.0, min_reps=10) for n in (SHORT, LONG))
    fused = [
        graph.fired.get("cache_write_attention", 0) for graph in report.graphs if graph.part == "decoder"
    ]
    print(
        f"batch {batch}, without {without or 'nothing'}: {(long - short) / (LONG - SHORT) * 1e3:.1f} us a step"
    )
    print(f"  generate() {SHORT} new tokens {short:.2f} ms, {LONG} new tokens {long:.2f} ms")
    print(f"  loops: {model.kernl_report.generate_loops}")
    print(f"  cache_write_attention fired in the decoder graphs: {fused}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--without", action="append", default=[], help="a rule to leave out (repeatable)")
    arguments = parser.parse_args()
    main(arguments.batch, arguments.without)
