"""Checks the decode-loop tests of encoder-decoder and decoder-only models share: kernl's ``generate()``
against Hugging Face's on the same prompt, the loops the report says ran, rows ending at different steps,
the streamer that sends a call to transformers' loop, and CUDA-graph chunks against the loop without them.

The models come from the test modules; every check takes an optimized model and the same model as Hugging
Face runs it, both on the test device in the test dtype."""

import contextlib
import copy
from collections.abc import Callable

import torch
from transformers.generation.streamers import BaseStreamer

from kernl.integration import optimize_model
from kernl.integration.decode import loop as decode_loop
from kernl_testing.device import on_gpu

DEVICE = "cuda" if on_gpu() else "cpu"
DTYPE = torch.float16 if on_gpu() else torch.float32
KERNL_LOOP = "kernl's loop"


def same_tokens(optimized, reference, seed=None, **arguments):
    """generate() on both models (sampling: kernl's with ``generator=``, HF's from the global generator,
    both seeded with ``seed``); asserts the same tokens (fp32 on the CPU; in fp16 a near tie may flip one)
    and returns kernl's output."""
    with torch.inference_mode():
        if seed is not None:
            ours = optimized.generate(generator=torch.Generator(DEVICE).manual_seed(seed), **arguments)
            torch.manual_seed(seed)
        else:
            ours = optimized.generate(**arguments)
        theirs = reference.generate(**arguments)
    ours_ids, theirs_ids = (getattr(out, "sequences", out) for out in (ours, theirs))
    assert ours_ids.shape == theirs_ids.shape or on_gpu(), (ours_ids.shape, theirs_ids.shape)
    assert on_gpu() or torch.equal(ours_ids, theirs_ids), (ours_ids, theirs_ids)
    return ours


def only_kernl_loop(optimized, kinds) -> None:
    """Calls of every kind in ``kinds`` ran, and every call of any kind ran kernl's loop."""
    loops = optimized.kernl_report.generate_loops
    assert set(kinds) <= set(loops), loops
    assert all(outcome.startswith(KERNL_LOOP) for outcomes in loops.values() for outcome in outcomes), loops


def greedy_sampling_and_beams(optimized, reference, input_ids, attention_mask, max_new_tokens) -> None:
    """On a fresh ``optimized``: one greedy call, one seeded sampling call (temperature, top-k, top-p) and
    one beam search (3 beams, 2 returned) on the two-row prompt (``input_ids``, ``attention_mask``:
    ``(2, S)``) give Hugging Face's tokens, and the report lists exactly those three calls, each on kernl's
    loop."""
    base = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens)
    same_tokens(optimized, reference, **base, do_sample=False)
    same_tokens(optimized, reference, seed=3, **base, do_sample=True, temperature=0.8, top_k=30, top_p=0.9)
    same_tokens(optimized, reference, **base, do_sample=False, num_beams=3, num_return_sequences=2)
    loops = optimized.kernl_report.generate_loops
    assert list(loops) == ["greedy", "sampling", "beam search"], loops
    assert all(len(outcomes) == 1 and outcomes[0].startswith(KERNL_LOOP) for outcomes in loops.values()), (
        loops
    )


def _ending_token(free: torch.Tensor, start: int) -> tuple[int, int, int]:
    """``(token, row, step)``: a token one row of ``free`` (greedy tokens of two rows from column ``start``
    on, no end of sequence) emits first at ``step`` >= 1 and the other row not by ``step + 1``: as the
    end-of-sequence token, it ends that row alone at that step."""
    rows = [free[row, start:].tolist() for row in range(2)]
    for step in range(1, len(rows[0]) - 2):
        for row in range(2):
            token = rows[row][step]
            if token not in rows[row][:step] and token not in rows[1 - row][: step + 2]:
                return token, row, step
    raise AssertionError(f"no token ends one row alone: {rows}")


def rows_end_on_eos_at_different_steps(optimized, reference, input_ids, attention_mask, max_new_tokens):
    """Greedy calls on a two-row prompt (``input_ids``, ``attention_mask``: ``(2, S)``) whose end-of-sequence
    token is one a row emits at an early step and the other later or never: that row ends first and pads;
    once both rows ended the call stops short of ``max_new_tokens``; ``min_new_tokens`` holds the end back.
    Hugging Face's tokens each time, every call on kernl's loop."""
    # generated tokens start after the decoder's start token, or after the prompt of a decoder-only model
    start = 1 if reference.config.is_encoder_decoder else input_ids.shape[1]
    base = dict(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new_tokens
    )
    with torch.inference_mode():
        free = reference.generate(**base, eos_token_id=None)  # nothing ends: every token
    eos, row, step = _ending_token(free, start)
    out = same_tokens(optimized, reference, **base, eos_token_id=eos)
    if not on_gpu():
        after = start + step + 1
        pad = optimized.generation_config.pad_token_id
        assert out[row, after:].eq(pad).all() and not out[1 - row, after:].eq(pad).all(), out
    # both rows end: the other row's next token ends it too
    out = same_tokens(
        optimized, reference, **base, eos_token_id=[eos, free[1 - row, start + step + 1].item()]
    )
    assert on_gpu() or out.shape[1] < start + max_new_tokens
    same_tokens(optimized, reference, **base, eos_token_id=eos, min_new_tokens=5)
    only_kernl_loop(optimized, ["greedy"])


@contextlib.contextmanager
def launches_of_full_chunks(optimized):
    """Within: every launch runs the full number of steps a chunk holds (as on the GPU, where a capture
    fixes them), the last one past max_length into the cache's spare positions."""
    loop = optimized.kernl_decode_loop
    exact = loop.exact_launches
    loop.exact_launches = False
    try:
        yield
    finally:
        loop.exact_launches = exact


class _Recorder(BaseStreamer):
    """A streamer keeping what generate() feeds it."""

    def __init__(self):
        self.tokens = []

    def put(self, value):
        self.tokens.append(value)

    def end(self):
        pass


def a_streamer_runs_transformers_loop(optimized, reference, **arguments) -> None:
    """A greedy call with ``arguments`` (3 new tokens or more) and a streamer: Hugging Face's tokens, the
    streamer fed by transformers' loop, and the report saying why that loop ran."""
    streamer = _Recorder()
    same_tokens(optimized, reference, **arguments, do_sample=False, streamer=streamer)
    assert len(streamer.tokens) >= 3  # transformers' loop fed it
    loops = optimized.kernl_report.generate_loops
    assert "transformers' loop: streamer given" in loops["greedy"], loops


def chunks_match_the_loop_without_cuda_graphs(model, prompt: Callable[[int], tuple]) -> None:
    """On the GPU: ``model`` (plain, on the device) optimized with CUDA graphs replays a chunk of steps
    captured once per cache and settings, and gives bit for bit the tokens of the same loop run without
    CUDA graphs, call after call; ``prompt(seed)`` gives ``(input_ids, attention_mask)``."""
    with_graphs, without = copy.deepcopy(model), copy.deepcopy(model)
    optimize_model(with_graphs)
    optimize_model(without, cuda_graphs=False)
    for seed in range(3):
        ids, mask = prompt(seed)
        for setting in (dict(do_sample=False), dict(do_sample=True, top_k=20)):
            arguments = dict(
                input_ids=ids, attention_mask=mask, max_new_tokens=19, min_new_tokens=19, **setting
            )
            with torch.inference_mode():
                replayed = with_graphs.generate(
                    generator=torch.Generator(DEVICE).manual_seed(seed), **arguments
                )
                direct = without.generate(generator=torch.Generator(DEVICE).manual_seed(seed), **arguments)
            assert torch.equal(replayed, direct), (seed, setting)
    states = with_graphs.kernl_decode_loop.states
    assert len(states) == 1
    captures = next(iter(states.values())).graphs.captures
    assert len(captures) == 2 and all(capture.graph is not None for capture in captures.values())
    loops = with_graphs.kernl_report.generate_loops
    assert loops["greedy"] == [f"kernl's loop ({decode_loop.STEPS_PER_LAUNCH} steps per CUDA graph launch)"]
