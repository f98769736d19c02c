"""``kernl bench`` without a GPU: a small embedded Bert through Triton's interpreter, checked against HF."""

import copy
import sys
import time

import torch
from transformers import BertConfig, BertModel

from kernl.integration import optimize_model

SMALL_BERT = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    vocab_size=1000,
    max_position_embeddings=128,
)


def run_cpu_check(print_fn=print) -> bool:
    """Optimize the small Bert, compare with HF fp32 on a padded batch, print the rule report."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(**SMALL_BERT)).eval()
    reference = copy.deepcopy(model)
    report = optimize_model(model)
    ids = torch.randint(1, SMALL_BERT["vocab_size"], (2, 21))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    print_fn("small Bert (2 layers, hidden 128, 4 heads), fp32, batch 2 x 21 tokens (one row padded)")
    start = time.perf_counter()
    with torch.inference_mode():
        actual = model(input_ids=ids, attention_mask=mask)
        expected = reference(input_ids=ids, attention_mask=mask)
    elapsed = time.perf_counter() - start
    ok = True
    real = mask.bool()  # padded positions hold zeros with kernl's packed execution, no defined value in HF
    for field in ("last_hidden_state", "pooler_output"):
        ours, theirs = (
            o[field][real] if field == "last_hidden_state" else o[field] for o in (actual, expected)
        )
        error = (ours - theirs).abs().max().item()
        good = error <= 1e-4
        ok &= good
        print_fn(f"  {field:<18} max |kernl - HF| = {error:.2e}  {'OK' if good else 'MISMATCH'}")
    print_fn(f"  first call (compile + interpreted kernels): {elapsed:.1f} s")
    print_fn(str(report))
    if not report.graphs or report.graphs[0].error:
        ok = False
    print_fn("speed figures need a CUDA GPU (compute capability >= 8.0): run `kernl bench` there.")
    return ok


if __name__ == "__main__":  # `kernl bench` runs this in a fresh Python when its own cannot interpret kernels
    from kernl.integration.bench.run import log_console

    sys.exit(0 if run_cpu_check(log_console().print) else 1)
