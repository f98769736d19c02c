"""The benchmarks' shared command line: --models and --m parsed and checked."""

import argparse
import sys

import pytest

from kernl_testing.benchmarking import parse_projection_arguments


def _parse(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["bench", *argv])
    return parse_projection_arguments(argparse.ArgumentParser(), ["bert-base", "t5-base"], (16, 1024))


def test_defaults_are_every_model_and_row_count(monkeypatch):
    args = _parse(monkeypatch)
    assert args.models == ["bert-base", "t5-base"] and args.m == [16, 1024]


def test_models_and_row_counts_are_comma_separated(monkeypatch):
    args = _parse(monkeypatch, "--models", "t5-base", "--m", "7,4096")
    assert args.models == ["t5-base"] and args.m == [7, 4096]


def test_an_unknown_model_exits_naming_the_argument(monkeypatch):
    with pytest.raises(SystemExit, match="--models: unknown \\['gpt'\\]; known: bert-base, t5-base"):
        _parse(monkeypatch, "--models", "bert-base,gpt")
