"""The generate() plumbing of kernl.integration.generation, without a model: the prompt bucketing, the
static cache default, its reuse and up-front allocation, beam search's in-place reorder and the cache
argument's names."""

from types import SimpleNamespace

import pytest
import torch

from kernl.integration import generation, hf_compat
from kernl.integration.report import OptimizationReport


def _recording_generate():
    calls = []

    def generate(*args, **kwargs):
        calls.append((args, kwargs))
        return "tokens"

    return generate, calls


def _model(pad=0, eos=1, cache_implementation=None):
    config = SimpleNamespace(pad_token_id=pad, eos_token_id=eos, cache_implementation=cache_implementation)
    return SimpleNamespace(generation_config=config)


def test_prompt_and_mask_are_padded_to_the_bucket_wherever_the_prompt_is_passed():
    generate, calls = _recording_generate()
    padded = generation._bucketed_generate(_model(pad=3), generate, lambda length: 16, OptimizationReport())
    ids, mask = torch.randint(5, 50, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    assert padded(ids, attention_mask=mask, max_new_tokens=4) == "tokens"
    padded(inputs=ids, attention_mask=mask)
    padded(input_ids=ids, attention_mask=mask)
    for (args, kwargs), place in zip(calls, ["positional", "inputs", "input_ids"], strict=True):
        sent = args[0] if place == "positional" else kwargs[place]
        assert sent.shape == (2, 16) and torch.equal(sent[:, :9], ids) and bool((sent[:, 9:] == 3).all())
        assert (
            torch.equal(kwargs["attention_mask"][:, :9], mask) and not kwargs["attention_mask"][:, 9:].any()
        )
    assert calls[0][1]["max_new_tokens"] == 4


def test_without_a_mask_only_prompts_without_pad_tokens_are_bucketed():
    generate, calls = _recording_generate()
    padded = generation._bucketed_generate(
        _model(pad=0, eos=1), generate, lambda length: 8, OptimizationReport()
    )
    padded(torch.tensor([[7, 8, 9]]))  # no pad token: every prompt token is real, the padding is masked
    assert calls[-1][1]["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]]
    ids = torch.tensor([[7, 8, 9, 0, 0], [7, 8, 9, 10, 11]])  # pad tokens: transformers releases differ
    padded(ids)  # on whether they are attended, so generate() decides, at the prompt's length
    assert calls[-1][0][0] is ids and "attention_mask" not in calls[-1][1]


def test_a_static_cache_is_the_default_of_calls_that_name_no_cache():
    generate, calls = _recording_generate()
    ids = torch.randint(5, 50, (1, 8))
    generation._bucketed_generate(_model(), generate, lambda length: 8, OptimizationReport())(ids)
    assert calls[-1][1]["cache_implementation"] == "static"
    for named in ({hf_compat.CACHE_NAME: object()}, {"cache_implementation": "dynamic"}):
        generation._bucketed_generate(_model(), generate, lambda length: 8, OptimizationReport())(
            ids, **named
        )
        assert calls[-1][1].keys() == named.keys()  # the caller's cache choice stands
    generation._bucketed_generate(
        _model(cache_implementation="offloaded"), generate, lambda length: 8, OptimizationReport()
    )(ids)
    assert "cache_implementation" not in calls[-1][1]  # nor does the model's generation config
    # without a cache (use_cache=False) a cache_implementation only makes transformers warn that it is unused
    generation._bucketed_generate(_model(), generate, lambda length: 8, OptimizationReport())(
        ids, use_cache=False
    )
    assert "cache_implementation" not in calls[-1][1]
    # over a static cache the decoder's attention maps span the whole cache, not the tokens so far:
    # a call that returns them keeps transformers' default cache, and with it their shapes
    generation._bucketed_generate(_model(), generate, lambda length: 8, OptimizationReport())(
        ids, output_attentions=True
    )
    assert "cache_implementation" not in calls[-1][1]


def test_calls_the_bucketing_cannot_handle_pass_through_unchanged():
    generate, calls = _recording_generate()
    report = OptimizationReport()
    padded = generation._bucketed_generate(_model(), generate, lambda length: 16, report)
    ids = torch.randint(5, 50, (2, 9))
    unchanged = [
        ((ids,), {"encoder_outputs": object()}),
        ((ids,), {"inputs_embeds": torch.zeros(2, 9, 4)}),
        ((ids,), {"attention_mask": torch.ones(2, 5)}),  # a mask of another shape: left for transformers
        ((torch.zeros(2, 9),), {}),  # not token ids
        ((ids,), {"output_hidden_states": True}),  # encoder outputs come back at the prompt's length
        ((ids[0],), {}),  # one-dimensional
        ((), {}),
    ]
    for args, kwargs in unchanged:
        padded(*args, **kwargs)
        sent_args, sent_kwargs = calls[-1]
        assert sent_kwargs.pop("cache_implementation") == "static"
        assert len(sent_args) == len(args) and all(a is b for a, b in zip(sent_args, args, strict=True))
        assert sent_kwargs.keys() == kwargs.keys() and all(sent_kwargs[k] is v for k, v in kwargs.items())
    # the report says why, once per reason
    assert report.notes == [
        f"generate(): a prompt ran at its own length: {reason}"
        for reason in (
            "the call passes encoder_outputs",
            "the call passes inputs_embeds",
            "attention_mask is not a tensor of the prompt's shape",
            "the prompt is not a 2-D tensor of token ids",
            "encoder hidden states or attentions are returned at the prompt's length",
        )
    ]
    bucketed = generation._bucketed_generate(_model(), generate, lambda length: length, OptimizationReport())
    bucketed(ids)
    assert calls[-1][0][0] is ids and "attention_mask" not in calls[-1][1]  # already at a bucket length


class _Cache:
    def __init__(self):
        self.resets = 0

    def reset(self):
        self.resets += 1


def test_static_caches_of_one_size_are_reset_and_reused_and_at_most_a_few_are_kept():
    model = SimpleNamespace(dtype=torch.float16, device=torch.device("cpu"))
    created = []

    def create(cache_implementation, batch_size, max_cache_len, prefill_chunk_size, model_kwargs):
        model._previous_max_cache_length = max(
            max_cache_len, getattr(model, "_previous_max_cache_length", -1)
        )
        created.append(_Cache())
        return created[-1]

    prepare = generation._reusing_static_cache(model, create)
    encoder = {"encoder_outputs": (torch.zeros(2, 16, 8),)}
    first = prepare("static", 2, 33, None, encoder)
    assert prepare("static", 2, 33, None, encoder) is first and first.resets == 1
    assert prepare("static", 4, 33, None, encoder) is not first  # another batch size
    assert prepare("static", 2, 33, None, {"encoder_outputs": (torch.zeros(2, 32, 8),)}) is not first
    for batch in range(5, 5 + generation.KEPT_CACHES):
        prepare("static", batch, 33, None, encoder)
    assert prepare("static", 2, 33, None, encoder) is not first  # the oldest ones were let go
    assert len(created) == 4 + generation.KEPT_CACHES
    second = prepare("static", 2, 33, None, encoder)
    with torch.inference_mode():  # inference tensors cannot be reset outside inference mode: apart
        assert prepare("static", 2, 33, None, encoder) is not second
    model.dtype = torch.float32  # model.float() after a call: the kept cache holds fp16 tensors
    assert prepare("static", 2, 33, None, encoder) is not second


def test_the_cache_argument_is_found_under_either_name():
    cache = object()
    assert hf_compat.cache_argument({"cache": cache, "use_cache": True}) == ("cache", cache)
    assert hf_compat.cache_argument({"past_key_values": cache}) == ("past_key_values", cache)
    assert hf_compat.cache_argument({"past_key_values": None}) == (None, None)
    assert not hf_compat.ready_static_cache(None)


class _Layer:
    """A cache layer whose ``reorder_cache`` replaces its tensors, as transformers' layers do."""

    def __init__(self, reorder):
        self.keys, self.values, self.length = torch.randn(4, 3), torch.randn(4, 2, 2), torch.tensor(5)
        self._reorder = reorder

    def reorder_cache(self, beam_idx):
        self.keys, self.values = self._reorder(self.keys, beam_idx), self._reorder(self.values, beam_idx)


def test_beam_search_reorders_write_the_rows_back_in_place():
    selecting = _Layer(lambda t, index: t.index_select(0, index))
    shifting = _Layer(lambda t, index: t.index_select(0, index) + 1)  # not a plain selection of rows
    resizing = _Layer(lambda t, index: t[:2])  # another shape: left to transformers
    layers = [selecting, shifting, resizing]
    cache = SimpleNamespace(layers=layers)
    generation._reorder_in_place(cache)
    kept = [(layer.keys, layer.values) for layer in layers[:2]]
    for beam_idx in (torch.tensor([1, 1, 0, 3]), torch.tensor([2, 0, 0, 1]), torch.tensor([3, 2, 1, 0])):
        expected = [(layer.keys.clone(), layer.values.clone()) for layer in layers]
        cache.reorder_cache(beam_idx)
        for (keys, values), layer in zip(expected[:2], layers[:2], strict=True):
            shift = 0 if layer is selecting else 1
            assert torch.equal(layer.keys, keys[beam_idx] + shift)
            assert torch.equal(layer.values, values[beam_idx] + shift)
        assert torch.equal(resizing.keys, expected[2][0][:2])
    assert all(layer.keys is k and layer.values is v for layer, (k, v) in zip(layers, kept, strict=False))
    reorder = cache.reorder_cache
    assert [name for _, name in reorder.selected] == ["keys", "values"] and reorder.own == [
        shifting,
        resizing,
    ]


class _LazyLayer:
    """A static cache layer: buffers of ``length`` slots allocated by its first update."""

    def __init__(self, length):
        self.length = length

    def lazy_initialization(self, keys, values):
        self.keys, self.values = (
            t.new_zeros((t.shape[0], t.shape[1], self.length, t.shape[-1])) for t in (keys, values)
        )


def _pair_cache(layers: int, lengths=(8, 5)):
    parts = [SimpleNamespace(layers=[_LazyLayer(length) for _ in range(layers)]) for length in lengths]
    return SimpleNamespace(self_attention_cache=parts[0], cross_attention_cache=parts[1])


def test_a_new_size_cache_is_allocated_like_the_earlier_ones():
    template = _pair_cache(2, lengths=(4, 3))
    for part in hf_compat.cache_parts(template):
        for layer in part.layers:
            layer.lazy_initialization(torch.zeros(2, 4, 1, 16, dtype=torch.float16), torch.zeros(2, 4, 1, 8))
    cache = _pair_cache(2)
    generation._allocate_like(cache, template, batch_size=6)
    for part, length in zip(hf_compat.cache_parts(cache), (8, 5), strict=True):
        for layer in part.layers:
            assert layer.keys.shape == (6, 4, length, 16) and layer.keys.dtype == torch.float16
            assert layer.values.shape == (6, 4, length, 8) and layer.values.dtype == torch.float32
    other, without_template = _pair_cache(3), _pair_cache(2)  # another structure; no earlier cache
    generation._allocate_like(other, template, batch_size=6)
    generation._allocate_like(without_template, None, batch_size=6)
    for left_lazy in (other, without_template):
        assert not any(
            hasattr(layer, "keys") for part in hf_compat.cache_parts(left_lazy) for layer in part.layers
        )


def test_the_cache_goes_to_generate_under_the_name_this_release_takes_and_a_warning_points_at_the_caller():
    generate, calls = _recording_generate()
    padded = generation._bucketed_generate(_model(), generate, lambda length: 8, OptimizationReport())
    cache, ids = object(), torch.randint(5, 50, (1, 8))
    old = next(name for name in hf_compat.CACHE_ARGUMENT_NAMES if name != hf_compat.CACHE_NAME)
    if hf_compat.CACHE_NAME == "past_key_values":  # before 5.24: nothing is deprecated
        padded(ids, past_key_values=cache)
    else:
        with pytest.warns(FutureWarning, match=f"{old} is deprecated") as warned:
            padded(ids, **{old: cache})
        assert warned[0].filename == __file__  # the caller's line, not kernl's
    assert calls[-1][1][hf_compat.CACHE_NAME] is cache and old not in calls[-1][1]
