"""``KERNL_TEST_ATTENTION_LOADS`` (``tma`` or ``tma+ws``) runs every test of this package whose launch
config comes from a heuristic with that load candidate instead (see
:class:`kernl.flash_attention.launch.LaunchConfig`; the varlen kernel takes ``tma`` only), so each
candidate passes the whole suite."""

import os

import pytest

from kernl.flash_attention import launch, launch_varlen

_CANDIDATES = {"tma": {"tma": True}, "tma+ws": {"tma": True, "warp_specialize": True}}


@pytest.fixture(autouse=True)
def attention_load_candidate(monkeypatch):
    name = os.environ.get("KERNL_TEST_ATTENTION_LOADS")
    if not name:
        yield None
        return
    if name not in _CANDIDATES:
        raise ValueError(f"KERNL_TEST_ATTENTION_LOADS must be one of {sorted(_CANDIDATES)}, got {name!r}")
    dense, varlen = launch.launch_config, launch_varlen.varlen_launch_config
    fields = _CANDIDATES[name]
    monkeypatch.setattr(launch, "launch_config", lambda *args: dense(*args)._replace(**fields))
    monkeypatch.setattr(launch_varlen, "varlen_launch_config", lambda *args: varlen(*args)._replace(tma=True))
    yield name
