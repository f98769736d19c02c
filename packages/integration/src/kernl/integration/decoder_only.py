"""``optimize_model`` on decoder-only language models (GPT-2, Llama, Mistral, Qwen2): every call either
runs on kernl under CUDA graphs or runs as PyTorch, never the rewritten graph kernel by kernel.

The model's ``forward`` is routed by its cache argument:

- no cache (a prefill, or a plain forward with ``use_cache=False``): the ``torch.compile``d forward
  (kernl's backend) replayed from a CUDA graph per input signature
  (:class:`~kernl.integration.forward_graphs.ForwardGraphs`); a cache the forward makes and returns
  is handed out as a fresh object each call (:class:`~kernl.integration.returned_cache.ReturnedCache`).
  Sequence lengths are not bucketed: each length compiles and captures its own graph;
- a static cache with its buffers allocated (``generate()``'s prefill, and its steps when transformers'
  loop runs them): the decoder step on kernl, captured whole and replayed
  (:mod:`kernl.integration.generation`, shared with encoder-decoder models); ``generate()`` uses a static
  cache by default, and its greedy, sampled and beam-search calls run kernl's decode loop
  (:mod:`kernl.integration.decode`) over the same compiled step;
- any other cache (a ``DynamicCache`` growing by one position a step: a new shape every call, which
  neither a CUDA graph nor a compiled graph can keep up with), or a static cache with sliding-window
  layers (Mistral with ``sliding_window`` set: their length is a Python int that changes every step):
  the original forward, as PyTorch, and the report says so.
"""

import functools
import inspect

import torch

from kernl.integration.arguments import argument_namer, input_wants_gradients
from kernl.integration.backend import KernlBackend
from kernl.integration.compile_state import limit_guarded, own_code
from kernl.integration.copies import copies_unoptimized
from kernl.integration.forward_graphs import ForwardGraphs
from kernl.integration.generation import optimize_generation
from kernl.integration.hf_compat import cache_argument, cache_layers
from kernl.integration.install import raise_recompile_limit, start_report
from kernl.integration.report import OptimizationReport
from kernl.integration.returned_cache import ReturnedCache
from kernl.integration.user_warnings import warn
from kernl.integration.validation import model_type, unsupported_reason

# The model types this path is tested on; other decoder-only types take the general path.
DECODER_ONLY_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2"})
DYNAMIC_CACHE_NOTE = (
    "forward calls passing a dynamic key/value cache run as PyTorch: its length changes every call, "
    "so no CUDA graph can replay it (generate() runs on kernl over a static cache)"
)

SLIDING_CACHE_NOTE = (
    "calls over a static cache with sliding-window layers run as PyTorch: such a layer keeps its length "
    "in a Python int that changes every step, which a captured step would replay stale"
)


def is_decoder_only(model: torch.nn.Module) -> bool:
    """Whether ``model`` is one of :data:`DECODER_ONLY_MODEL_TYPES` (a base model or a ``*ForCausalLM``)."""
    return model_type(model) in DECODER_ONLY_MODEL_TYPES


def optimize_decoder_only(model: torch.nn.Module, cuda_graphs: bool) -> OptimizationReport:
    """Install kernl on a decoder-only ``model`` in place (see the module docstring); returns the report,
    also kept as ``model.kernl_report``."""
    device = next(model.parameters()).device
    reason = unsupported_reason(device)
    report = start_report(model, device, reason)
    if reason is not None:
        return report
    raise_recompile_limit(64)
    original = model.forward
    backend = KernlBackend(report, [*model.parameters(), *model.buffers()], "forward")
    compiled = torch.compile(own_code(original), backend=backend, dynamic=False)
    returned = ReturnedCache(limit_guarded(compiled, original, report, "decoder-only"))
    prefill = returned.split
    if device.type == "cuda" and cuda_graphs:
        prefill = model.kernl_cuda_graphs = ForwardGraphs(returned.split, model, report)
    report.notes.append("sequence lengths are not bucketed: each length compiles and captures its own graph")
    if getattr(model, "generation_config", None) is not None:
        optimize_generation(model, report, None, cuda_graphs)
    with_cache = model.forward  # generate()'s steps on kernl over a static cache, other caches as PyTorch
    name_arguments = argument_namer(inspect.signature(original))

    @functools.wraps(original)  # transformers validates generate()'s kwargs against this signature
    def forward(*args, **kwargs):
        if model.training or input_wants_gradients(args, kwargs) or name_arguments is None:
            return original(*args, **kwargs)
        arguments = name_arguments(args, kwargs)
        cache = cache_argument(arguments)[1]
        if cache is not None:
            note = (
                DYNAMIC_CACHE_NOTE
                if not getattr(cache, "is_compileable", False)
                else SLIDING_CACHE_NOTE
                if any(getattr(layer, "is_sliding", False) for layer in cache_layers(cache))
                else None
            )
            if note is not None and note not in report.notes:
                report.notes.append(note)
                warn(f"kernl: {note}")
            return original(**arguments) if note == SLIDING_CACHE_NOTE else with_cache(**arguments)
        with torch.no_grad():
            return returned.rebuild(prefill(**arguments))

    model.forward = forward
    model.kernl_original_forward = original
    copies_unoptimized(model)  # also for a base model, which has no generate() to install it
    return report
