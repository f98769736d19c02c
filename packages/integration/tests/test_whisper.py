"""optimize_model on Whisper: generate(input_features=...) runs the encoder (fixed-length log-mel input,
one graph per batch size) and the decoder steps (static cache) on kernl, with Hugging Face's tokens;
long-form audio and token timestamps run on transformers' path, with a warning and a report note."""

import copy
import warnings

import pytest
import torch
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

from kernl.integration import optimize_model
from kernl_testing import assert_matches_reference, on_gpu

DTYPE = torch.float16 if on_gpu() else torch.float32
LAYERS = 2
# The encoder takes 2 * max_source_positions frames; Whisper's 1500 positions (3000 frames, 30 s) make
# the interpreter slow, and transformers checks only that the two agree.
POSITIONS = 32
FRAMES = 2 * POSITIONS
MEL_BINS = 80
# Special tokens of the tiny vocabulary: languages, tasks, then timestamps from NO_TIMESTAMPS + 1 on.
START, EOS, PAD = 3, 1, 0
LANGUAGES = {"<|en|>": 10, "<|fr|>": 11}
TASKS = {"transcribe": 12, "translate": 13}
NO_TIMESTAMPS = 60
SCALE = 4.0  # whole-encoder outputs: per-element rounding compounds over the layers (as in test_t5)


def whisper_model(
    kit, multilingual: bool = False, timestamps: bool = False
) -> WhisperForConditionalGeneration:
    """A tiny Whisper (d_model 64, 4 heads, 2 + 2 layers, 80 mel bins, 32 positions) whose tokens follow the
    audio: every linear and convolution weight drawn with variance 1 / fan-in (transformers' 0.02 leaves the
    residual stream to the position table, and every row of a batch decodes alike), and an untied output
    projection with logits of about N(0, 1) that never ends the sequence. Its generation config knows
    timestamps when asked (tokens from NO_TIMESTAMPS + 1 on; else none are), and, ``multilingual``, two
    languages and the tasks."""
    config = WhisperConfig(
        vocab_size=120, d_model=64, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=MEL_BINS,
        max_source_positions=POSITIONS, max_target_positions=64, decoder_start_token_id=START,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS, tie_word_embeddings=False,
        suppress_tokens=None, begin_suppress_tokens=None,
    )  # fmt: skip
    model = kit.build(WhisperForConditionalGeneration, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, fan_in**-0.5, generator=generator)
            if isinstance(module, torch.nn.Embedding) and module is not model.get_encoder().embed_positions:
                module.weight.normal_(0, 0.5, generator=generator)
        for layer in model.model.decoder.layers:  # a peaked, strong cross-attention: each row's audio shows
            layer.encoder_attn.q_proj.weight.mul_(4)
            layer.encoder_attn.out_proj.weight.mul_(4)
        model.proj_out.weight.mul_(0.125 * 64**0.5)  # logits ~ N(0, 1) over the final layer norm
        model.proj_out.weight[EOS] = 0
    settings = dict(
        decoder_start_token_id=START, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS,
        is_multilingual=multilingual,
    )  # fmt: skip
    if timestamps:
        settings.update(no_timestamps_token_id=NO_TIMESTAMPS, max_initial_timestamp_index=10)
    if multilingual:
        settings.update(lang_to_id=LANGUAGES, task_to_id=TASKS)
    model.generation_config = GenerationConfig(**settings)
    return model


def features(batch: int, frames: int = FRAMES, seed: int = 0) -> torch.Tensor:
    """Random log-mel features ``(batch, 80, frames)``, fp32 on CPU, a different row each."""
    return torch.randn(batch, MEL_BINS, frames, generator=torch.Generator().manual_seed(seed))


def optimized_and_reference(kit, multilingual: bool = False, timestamps: bool = False):
    """An optimized copy of a tiny Whisper (:func:`whisper_model`) and the plain model, both on the test
    device in ``DTYPE``, and the report."""
    model = whisper_model(kit, multilingual, timestamps)
    optimized = copy.deepcopy(model).to(kit.device, DTYPE)
    report = optimize_model(optimized)
    return optimized, model.to(kit.device, DTYPE), report


def same_tokens(optimized, reference, *args, **kwargs):
    """Generate with both models under inference mode; in fp32 (CPU) the tokens must be HF's exactly."""
    with torch.inference_mode():
        tokens = optimized.generate(*args, **kwargs)
        expected = reference.generate(*args, **copy.deepcopy(kwargs))
    sequences = [
        getattr(t, "sequences", t) if not isinstance(t, dict) else t["sequences"] for t in (tokens, expected)
    ]
    assert sequences[0].shape == sequences[1].shape
    assert torch.equal(*sequences) or on_gpu(), sequences  # fp16: a near tie between logits may flip a token
    return sequences[0]


def test_whisper_encoder_matches_the_fp64_reference(kit):
    """The encoder on kernl gives the fp64 model's hidden states (as close as HF in the same dtype), and the
    rules fire on every layer's attention, linear + GELU and layer norms."""
    model = whisper_model(kit)
    reference = copy.deepcopy(model).double().get_encoder()
    peer = copy.deepcopy(model).to(kit.device, DTYPE).get_encoder()
    optimized = copy.deepcopy(model).to(kit.device, DTYPE)
    report = optimize_model(optimized)
    audio = features(2, seed=3)
    with torch.inference_mode():
        expected = reference(audio.double()).last_hidden_state
        same_dtype = peer(audio.to(kit.device, DTYPE)).last_hidden_state
        actual = optimized.get_encoder()(audio.to(kit.device, DTYPE)).last_hidden_state
    assert_matches_reference(actual, expected, same_dtype, name="encoder", scale=SCALE)
    [graph] = report.graphs
    assert graph.part == "encoder" and graph.error is None, str(report)
    assert graph.fired["attention_sdpa"] == LAYERS and graph.fired["layer_norm"] == 2 * LAYERS + 1
    assert graph.fired["linear_act"] >= 2 * LAYERS  # fc1 + GELU and fc2 of every layer, and the projections
    assert graph.attention_masks == {"none": LAYERS}
    assert graph.kept == {"activation": 2}, graph.kept  # the GELUs after the two convolutions
    assert any("not bucketed, one graph per batch size" in note for note in report.notes)
    assert not any("padding" in note for note in report.notes), report.notes


def test_whisper_generate_runs_encoder_and_decoder_on_kernl(kit):
    """Greedy generate() from input features: HF's tokens for a batch of two different rows, a second call
    (the kept static cache reused) and a batch of one; the encoder and the decoder graphs on kernl."""
    optimized, reference, report = optimized_and_reference(kit)
    arguments = dict(max_new_tokens=6, do_sample=False)
    batch = features(2, seed=1).to(kit.device, DTYPE)
    tokens = same_tokens(optimized, reference, input_features=batch, **arguments)
    assert tokens.shape[0] == 2 and not torch.equal(tokens[0], tokens[1])  # the rows follow their audio
    assert len(set(tokens[0, 1:].tolist())) > 1  # not one token repeated
    same_tokens(optimized, reference, features(2, seed=2).to(kit.device, DTYPE), **arguments)  # positional
    same_tokens(optimized, reference, input_features=batch[:1], **arguments)
    # batch 2: the encoder, the first call's steps (its prefill allocates the cache, as PyTorch), the
    # second call's prefill over the reused cache; batch 1: its encoder, prefill and steps
    parts = [graph.part for graph in report.graphs]
    assert parts == ["encoder", "decoder", "decoder", "encoder", "decoder", "decoder"], str(report)
    for graph in report.graphs:
        assert graph.error is None and graph.kept.keys() <= {"activation"}, str(report)
        assert graph.fired["attention_sdpa"] == (LAYERS if graph.part == "encoder" else 2 * LAYERS)
        assert graph.fired["layer_norm"] == (2 if graph.part == "encoder" else 3) * LAYERS + 1
        assert graph.fired["linear_act"] > 0
        if not on_gpu():
            assert graph.runs_as == "rewritten graph, no CUDA graph (Triton interpreter)", str(report)
        elif graph.part == "encoder":
            assert graph.runs_as == "CUDA graph (whole forward)", str(report)
        else:  # a graph's own CUDA graphs, or the whole step's
            assert graph.runs_as.startswith("CUDA graph"), str(report)
    assert f"2x{MEL_BINS}x{FRAMES}" in report.graphs[0].inputs
    assert f"1x{MEL_BINS}x{FRAMES}" in report.graphs[3].inputs
    assert any("decoder on kernl with the 'static' cache" in note for note in report.notes)
    assert not any("ran on transformers' path" in note or "own length" in note for note in report.notes)
    if on_gpu():  # one whole-forward capture of the encoder per batch size
        assert len(optimized.get_encoder().kernl_cuda_graphs.captures) == 2


def test_whisper_timestamps_and_languages_run_on_kernl(kit):
    """Short-form timestamps (a logits processor) and a multilingual model called without a language
    (language detection's one step without a cache as PyTorch, then the generation) run on kernl with
    HF's tokens; the report says how language detection ran, and kernl warns of nothing."""
    optimized, reference, report = optimized_and_reference(kit, multilingual=True, timestamps=True)
    audio = features(2, seed=4).to(kit.device, DTYPE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # both prompts hold 3 tokens (start, language, task or no-timestamps): one set of decoder graphs
        same_tokens(optimized, reference, audio, max_new_tokens=4, return_timestamps=True, language="en")
        assert not any("language detection" in note for note in report.notes)
        same_tokens(optimized, reference, audio, max_new_tokens=4)
    assert not [str(w.message) for w in caught if str(w.message).startswith("kernl")]
    assert any("language detection" in note for note in report.notes), report.notes
    assert [graph.part for graph in report.graphs if graph.part == "decoder"] == ["decoder"] * 2, str(report)
    assert all(graph.error is None for graph in report.graphs), str(report)


@pytest.mark.parametrize("case", ["long-form", "token timestamps"])
def test_whisper_calls_off_kernl_run_on_transformers_path_and_say_so(kit, case):
    """Long-form audio (more frames than one window) and return_token_timestamps run transformers'
    decoder: the same tokens as HF, a warning naming the reason and a note in the report."""
    optimized, reference, report = optimized_and_reference(kit, timestamps=True)
    if case == "long-form":
        frames = 2 * FRAMES + 10
        audio = features(2, frames=frames, seed=5).to(kit.device, DTYPE)
        mask = torch.ones(2, frames, dtype=torch.long, device=kit.device)
        mask[1, FRAMES + 20 :] = 0  # the second row is shorter
        arguments = dict(input_features=audio, attention_mask=mask, return_timestamps=True, max_new_tokens=4)
        reason = "long-form audio"
    else:
        for model in (optimized, reference):
            model.generation_config.alignment_heads = [[1, 0], [1, 2]]
        audio = features(2, seed=6).to(kit.device, DTYPE)
        arguments = dict(input_features=audio, return_token_timestamps=True, max_new_tokens=4)
        reason = "return_token_timestamps"
    with pytest.warns(UserWarning, match=f"kernl: {reason}"):
        same_tokens(optimized, reference, **arguments)
    notes = [note for note in report.notes if "ran on transformers' path" in note]
    assert len(notes) == 1 and reason in notes[0], report.notes
    assert all(graph.part == "encoder" for graph in report.graphs), str(report)  # the encoder stays on kernl
    assert report.graphs and all(graph.error is None for graph in report.graphs)


def test_a_direct_encoder_call_after_generate_reuses_the_encoder_graph(kit):
    """generate() calls the encoder with output_attentions=None and output_hidden_states=None (a generation
    config that does not set them), which transformers reads as false like the config's False: dropped,
    so a direct call (language detection's, a user's) shares generate()'s encoder graph."""
    optimized, _, report = optimized_and_reference(kit)
    assert optimized.generation_config.output_attentions is None  # as in Whisper's generation_config.json
    with torch.inference_mode():
        # an inference tensor, as the window generate() cuts out of the features is (TorchDynamo guards on
        # that: a normal tensor would compile again on the CPU; on a GPU the capture replays either way)
        audio = features(2, seed=7).to(kit.device, DTYPE).clone()
        optimized.generate(audio, max_new_tokens=2)
        encoder_graphs = [graph.inputs for graph in report.graphs if graph.part == "encoder"]
        optimized.get_encoder()(audio)
        optimized.get_encoder()(input_features=audio, output_attentions=False, output_hidden_states=None)
    assert [graph.inputs for graph in report.graphs if graph.part == "encoder"] == encoder_graphs, str(report)


@pytest.mark.skipif(not on_gpu(), reason="CUDA graphs need a GPU")
def test_whisper_replays_match_the_compiled_model(kit):
    """The encoder's capture (one per batch size) and the decoder's give bit for bit the encoder states
    and scores of the same kernels run without CUDA graphs, call after call, on new audio each time."""
    model = whisper_model(kit).to("cuda", torch.float16)
    with_graphs, without = copy.deepcopy(model), copy.deepcopy(model)
    optimize_model(with_graphs)
    optimize_model(without, cuda_graphs=False)
    arguments = dict(max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    for seed in range(3):
        audio = features(2, seed=seed).to("cuda", torch.float16)
        with torch.inference_mode():
            states = [m.get_encoder()(audio).last_hidden_state for m in (with_graphs, without)]
            replayed, direct = (m.generate(audio, **arguments) for m in (with_graphs, without))
        assert torch.equal(*states), f"call {seed}"
        assert torch.equal(replayed.sequences, direct.sequences)
        for step, (ours, theirs) in enumerate(zip(replayed.scores, direct.scores, strict=True)):
            assert torch.equal(ours, theirs), f"call {seed}, step {step}"
    assert len(with_graphs.get_encoder().kernl_cuda_graphs.captures) == 1
    assert all(graph.runs_as.startswith("CUDA graph") for graph in with_graphs.kernl_report.graphs)
