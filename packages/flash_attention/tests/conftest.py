"""``KERNL_TEST_ATTENTION_LOADS`` (``tma`` or ``tma+ws``) runs every test of this package whose launch
config comes from the heuristic with that load candidate of the dense kernel instead (see
:class:`kernl.flash_attention.launch.LaunchConfig`), so each candidate passes the whole suite."""

import os

import pytest

from kernl.flash_attention import launch

_CANDIDATES = {"tma": {"tma": True}, "tma+ws": {"tma": True, "warp_specialize": True}}


@pytest.fixture(autouse=True)
def attention_load_candidate(monkeypatch):
    name = os.environ.get("KERNL_TEST_ATTENTION_LOADS")
    if not name:
        yield None
        return
    if name not in _CANDIDATES:
        raise ValueError(f"KERNL_TEST_ATTENTION_LOADS must be one of {sorted(_CANDIDATES)}, got {name!r}")
    heuristic = launch.launch_config
    fields = _CANDIDATES[name]
    monkeypatch.setattr(launch, "launch_config", lambda *args: heuristic(*args)._replace(**fields))
    yield name
