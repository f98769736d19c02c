"""Which loop runs a ``generate()`` call of an optimized model: kernl's (:mod:`kernl.integration.decode.loop`)
or transformers', as before.

A call whose arguments are in the loop's set (:func:`~kernl.integration.decode.settings.call_refusal`)
goes to ``generate()`` with the loop as its ``custom_generate`` decoding method: transformers prepares
the call as usual and hands the decoding to the loop, which may still give it back to transformers'
decoding method for what only the prepared call shows (a logits processor without a kernl counterpart).
Any other call runs transformers' ``generate()`` untouched. Either way the report notes the loop and the
reason, per kind of call. ``generator=`` (kernl's extension, see :mod:`kernl.integration.decode.draws`)
is accepted on both paths.
"""

import functools

from kernl.integration.decode.draws import check_generator, generator_as_global
from kernl.integration.decode.loop import DecodeLoop
from kernl.integration.decode.settings import call_kind, call_refusal
from kernl.integration.report import OptimizationReport


def routed_generate(model, generate, loop: DecodeLoop, report: OptimizationReport):
    """``generate`` (the model's ``generate()``) with its decoding routed to ``loop`` when the call allows."""

    @functools.wraps(generate)
    def routed(*args, generator=None, **kwargs):
        check_generator(generator, model.device)
        config = kwargs.get("generation_config") or model.generation_config
        setting = lambda name: kwargs.get(name, getattr(config, name, None))  # noqa: E731
        reason = call_refusal(model, kwargs, setting) if loop.enabled else "kernl's loop turned off"
        if reason is None:
            return generate(*args, custom_generate=loop.decode, generator=generator, **kwargs)
        report.note_loop(call_kind(setting), f"transformers' loop: {reason}")
        with generator_as_global(generator):
            return generate(*args, **kwargs)

    return routed
