"""kernl's warnings name the user's line (here, this file's), not a line of kernl, torch or copy.py."""

import copy

import pytest
import torch
from transformers import BertConfig, BertModel

from kernl.integration import fallback, optimize_model
from kernl.integration.rules import layer_norm as layer_norm_rule


def tiny_bert(kit):
    return kit.build(BertModel, kit.tiny_config(BertConfig, num_hidden_layers=1))


def test_the_runs_unchanged_warning_names_the_optimize_model_call(kit, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU model without the interpreter
    model = tiny_bert(kit)
    with pytest.warns(UserWarning, match="runs unchanged") as records:
        optimize_model(model)
    assert [record.filename for record in records] == [__file__]


def test_the_kernel_failure_warning_names_the_call_into_kernl(monkeypatch):
    monkeypatch.setattr(fallback, "FAILURES", {})

    def broken(*args):
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(layer_norm_rule, "layer_norm", broken)
    x, weight, bias = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    with pytest.warns(UserWarning, match="runs as PyTorch") as records:
        layer_norm_rule.layer_norm_call(x, weight, bias, 1e-5, None)
    assert [record.filename for record in records] == [__file__]


def test_the_copy_warning_names_the_deepcopy_call(kit):
    model = tiny_bert(kit).to(kit.device)
    optimize_model(model)
    with pytest.warns(UserWarning, match="plain PyTorch model") as records:
        copy.deepcopy(model)
    assert [record.filename for record in records] == [__file__]
