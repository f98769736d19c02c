"""The random numbers of sampling, drawn as transformers draws them.

transformers samples a step's token with ``torch.multinomial(probs, num_samples=1)``, which for one sample
draws ``torch.empty_like(probs).exponential_()`` and takes ``argmax(probs / noise)``. ``multinomial``
checks its input on the host (a synchronisation a CUDA graph cannot hold), so kernl's loop draws the same
noise itself, one ``(batch, vocab)`` draw per step in transformers' order, outside the captured steps,
and picks the token inside them: the same generator state gives the same tokens.

``generate(..., generator=torch.Generator)`` is a kernl extension (transformers' ``generate`` has no
generator argument): the draws come from that generator instead of the global one. A call that runs
transformers' loop draws from the global generator set to that generator's state
(:func:`generator_as_global`), so it gives the tokens kernl's loop would have.
"""

import contextlib

import torch


def check_generator(generator, device: torch.device) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``generator`` unless it is None or a ``torch.Generator``
    on ``device``'s type."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, not {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, the model on {device}: they must match")


def draw_noise(noise: torch.Tensor, steps: int, generator: torch.Generator | None) -> None:
    """Fill ``noise[:steps]`` (fp32 ``(slots, batch, vocab)``), one ``exponential_`` draw per step in step
    order, as ``torch.multinomial(probs, 1)`` would draw them."""
    for slot in range(steps):
        noise[slot].exponential_(1, generator=generator)


def sampled(scores: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """int64 ``(batch,)``: ``torch.multinomial(softmax(scores), 1)`` for the draw ``noise`` (fp32, the
    shape of ``scores``), without its host-side checks."""
    probs = torch.nn.functional.softmax(scores, dim=-1)
    return probs.div(noise).argmax(dim=-1)


@contextlib.contextmanager
def generator_as_global(generator: torch.Generator | None):
    """Within the context, the global generator of ``generator``'s device starts from ``generator``'s
    state; on exit ``generator`` takes the state it reached and the global generator gets its own back."""
    if generator is None:
        yield
        return
    device = generator.device
    on_gpu = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if on_gpu else None
    with torch.random.fork_rng(devices=[index] if on_gpu else []):
        if on_gpu:
            torch.cuda.set_rng_state(generator.get_state(), index)
        else:
            torch.set_rng_state(generator.get_state())
        yield
        generator.set_state(torch.cuda.get_rng_state(index) if on_gpu else torch.get_rng_state())
