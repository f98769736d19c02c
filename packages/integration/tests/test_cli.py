"""The main job's command works and checks its own numbers."""

from kernl.integration.cli import main


def test_demo_passes(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "layer_norm(x + residual)" in out and "MISMATCH" not in out
