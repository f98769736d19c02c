"""BART's encoder layers' fp16 overflow clamp without a host read (:mod:`kernl.integration.overflow_branches`):
the layer gives the original's values bit for bit, with and without an overflow; it compiles to one graph
where the original breaks it; and the fp16 BART encoder on kernl is one graph (on the GPU: one CUDA
graph, no failed capture), with Hugging Face's values. Classes without the clamp are left alone."""

import copy
import importlib
import importlib.util
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration
from transformers.models.bart.modeling_bart import BartDecoderLayer, BartEncoderLayer
from transformers.models.t5.modeling_t5 import T5Block

from kernl.integration import optimize_model
from kernl.integration.overflow_branches import branchless_forward, make_overflow_clamps_branchless
from kernl_testing import on_gpu

# Encoder layers that copy BART's clamp (transformers 5.17 and 5.25), by module name.
COPIES = {
    "marian": "MarianEncoderLayer",
    "plbart": "PLBartEncoderLayer",
    "mvp": "MvpEncoderLayer",
    "blenderbot_small": "BlenderbotSmallEncoderLayer",
}

D_MODEL = 64


def _bart_config() -> BartConfig:
    return BartConfig(
        vocab_size=120, d_model=D_MODEL, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
    )  # fmt: skip


def _fp16_layer(norm_weight: float) -> BartEncoderLayer:
    """A BART encoder layer in fp16 on the CPU whose final layer norm scales by ``norm_weight`` (large: its
    output overflows fp16 for the larger normalised values, and some finite ones pass the clamp value)."""
    torch.manual_seed(0)
    config = _bart_config()
    config._attn_implementation = "sdpa"  # a model sets it; a layer built alone has none
    layer = BartEncoderLayer(config).eval()
    with torch.no_grad():
        layer.final_layer_norm.weight.fill_(norm_weight)
    return layer.half()


def _hidden(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((2, 7, D_MODEL), generator=generator).half()


@pytest.mark.parametrize("norm_weight", [1.0, 60000.0], ids=["finite", "overflow"])
def test_branchless_layer_gives_the_original_values(norm_weight):
    """Without an overflow the values pass unchanged; with one, every value is clamped as the original's
    branch does (finite values past the clamp value included), bit for bit."""
    layer = _fp16_layer(norm_weight)
    hidden = _hidden(seed=1)
    normed = []
    hook = layer.final_layer_norm.register_forward_hook(lambda module, args, out: normed.append(out))
    with torch.inference_mode():
        expected = BartEncoderLayer.forward(layer, hidden, None)
        actual = branchless_forward(BartEncoderLayer)(layer, hidden, None)
    hook.remove()
    overflowed = not bool(torch.isfinite(normed[0]).all())
    assert overflowed == (norm_weight > 1), "the case does not test what it says"
    if overflowed:  # the original clamped: nothing infinite is left, finite values were clamped too
        clamp_value = torch.finfo(torch.float16).max - 1000
        assert bool(torch.isfinite(expected).all()) and bool((normed[0].abs() > clamp_value).any())
    assert torch.equal(actual, expected)


def test_branchless_layer_compiles_to_one_graph():
    """The original breaks TorchDynamo's graph at its clamp in fp16 (fullgraph refuses it); the branchless
    layer compiles whole."""
    layer = _fp16_layer(1.0)
    hidden = _hidden(seed=2)
    branchless = branchless_forward(BartEncoderLayer)
    with torch.inference_mode():
        expected = BartEncoderLayer.forward(layer, hidden, None)
        with pytest.raises(Exception, match="(?i)data-dependent"):
            torch.compile(
                lambda h: BartEncoderLayer.forward(layer, h, None), fullgraph=True, backend="eager"
            )(hidden)
        compiled = torch.compile(lambda h: branchless(layer, h, None), fullgraph=True, backend="eager")
        assert torch.equal(compiled(hidden), expected)


# What a host read of a tensor's value dispatches (which one is seen depends on the mode and the release).
_READS = (
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.item.default,
    torch.ops.aten.is_nonzero.default,
)


class _HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host (``.item()``, ``bool(tensor)``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in _READS
        return func(*args, **(kwargs or {}))


def test_fp16_bart_encoder_layers_read_nothing_back_to_the_host():
    """BART's fp16 encoder reads one value back per layer (its clamp's condition); with the branchless
    layers installed it reads none, and gives the same values."""
    model = BartForConditionalGeneration(_bart_config()).eval().half()
    encoder = model.get_encoder()
    ids = torch.randint(5, 120, (2, 9), generator=torch.Generator().manual_seed(3))
    reads = []
    outputs = []
    for install in (False, True):
        if install:
            make_overflow_clamps_branchless(encoder)
        with torch.inference_mode(), _HostReads() as counter:
            outputs.append(encoder(input_ids=ids).last_hidden_state)
        reads.append(counter.count)
    assert reads[0] >= len(encoder.layers) and reads[1] == 0, reads
    assert torch.equal(outputs[1], outputs[0])


@pytest.mark.parametrize("module", sorted(COPIES))
def test_copies_of_the_clamp_in_other_models_are_found(module):
    layer_class = getattr(
        importlib.import_module(f"transformers.models.{module}.modeling_{module}"), COPIES[module]
    )
    assert branchless_forward(layer_class) is not None


def test_classes_without_the_clamp_are_left_alone():
    """BART's decoder layer and T5's block hold no such clamp: nothing is installed, no note."""
    assert branchless_forward(BartDecoderLayer) is None and branchless_forward(T5Block) is None
    config = T5Config(vocab_size=120, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)
    t5 = T5ForConditionalGeneration(config).eval()
    assert make_overflow_clamps_branchless(t5) == []
    assert not any("forward" in module.__dict__ for module in t5.modules())


def test_fp16_bart_encoder_is_one_graph_with_hugging_face_values(kit):
    """The fp16 BART encoder on kernl: one graph (it was four, the encoder's frame skipped by TorchDynamo),
    on the GPU replayed from one CUDA graph with no failed capture (the host read had made it fail), and
    the values of Hugging Face's fp16 encoder against an fp64 reference. A deep copy is a plain model."""
    model = kit.build(BartForConditionalGeneration, _bart_config())
    ids, mask = kit.padded_batch(2, 11, [11, 6], vocab=120)
    call = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.tensor([[2, 7, 9], [2, 3, 3]]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = kit.compare_with_reference(
            model, torch.float16, [call], ["encoder_last_hidden_state"], scale=4.0
        )
    failed = [str(w.message) for w in caught if "capture failed" in str(w.message)]
    assert not failed, failed
    encoder = [graph for graph in report.graphs if graph.part == "encoder"]
    assert len(encoder) == 1 and encoder[0].error is None, str(report)
    assert encoder[0].runs_as.startswith("CUDA graph" if on_gpu() else "rewritten graph"), str(report)
    assert encoder[0].kept == {}, str(report)
    assert any(
        "overflow clamp made branchless" in note and "2 BartEncoderLayer" in note for note in report.notes
    )


def test_a_copy_of_an_optimized_bart_has_the_classes_forward(kit):
    optimized = kit.build(BartForConditionalGeneration, _bart_config()).to(kit.device)
    optimize_model(optimized)
    layers = optimized.get_encoder().layers
    assert all("forward" in layer.__dict__ for layer in layers)
    with pytest.warns(UserWarning, match="plain PyTorch model"):
        plain = copy.deepcopy(optimized)
    assert not any("forward" in layer.__dict__ for layer in plain.get_encoder().layers)


def _clamped(hidden_states: torch.Tensor) -> torch.Tensor:
    """fp16 values that overflow: the clamp has work to do."""
    return hidden_states * 30000.0


class _PrivateScale(torch.nn.Module):
    """A layer with BART's clamp whose forward reads a private attribute (a name its class mangles)."""

    def __init__(self):
        super().__init__()
        self.__scale = 3.0

    def forward(self, hidden_states):
        hidden_states = _clamped(hidden_states) * self.__scale
        if hidden_states.dtype == torch.float16 and not torch.isfinite(hidden_states).all():
            clamp_value = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
        return hidden_states


def _identity(function):
    return function


class _ClassScopeDecorator(torch.nn.Module):
    """A layer with BART's clamp whose forward's decorator is a name of the class body, not the module."""

    keep = staticmethod(_identity)

    @keep
    def forward(self, hidden_states):
        hidden_states = _clamped(hidden_states)
        if hidden_states.dtype == torch.float16 and not torch.isfinite(hidden_states).all():
            clamp_value = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
        return hidden_states


class _SubclassOfPrivateScale(_PrivateScale):
    """Inherits the forward: rebuilt as its defining class's, private names mangled with that class's name."""


@pytest.mark.parametrize("layer_class", [_PrivateScale, _SubclassOfPrivateScale, _ClassScopeDecorator])
def test_installed_layers_give_the_class_forward_values(layer_class):
    """Whatever the rebuild does with a forward (rebuilt, or left alone where its source cannot stand
    for it), the layer gives what its class's forward gives, and installing never raises."""
    layer = layer_class().eval()
    hidden = _hidden(seed=4)
    with torch.inference_mode():
        expected = layer_class.forward(layer, hidden)
        make_overflow_clamps_branchless(layer)
        actual = layer(hidden)
    assert torch.equal(actual, expected)


def test_private_names_are_mangled_as_in_the_class():
    assert branchless_forward(_PrivateScale) is not None
    assert branchless_forward(_SubclassOfPrivateScale) is not None


_STALE_LAYER = """
import torch


class Layer(torch.nn.Module):
    def forward(self, hidden_states):
        hidden_states = hidden_states * {scale}
        if hidden_states.dtype == torch.float16 and not torch.isfinite(hidden_states).all():
            clamp_value = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
        return hidden_states
"""


def test_a_forward_whose_file_changed_since_import_is_left_alone(tmp_path):
    """The source on disk is not the code that runs: rebuilding from it would change the layer's values."""
    path = tmp_path / "kernl_stale_layer.py"
    path.write_text(_STALE_LAYER.format(scale="2.0"))
    spec = importlib.util.spec_from_file_location("kernl_stale_layer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path.write_text(_STALE_LAYER.format(scale="30.0"))
    assert branchless_forward(module.Layer) is None
