"""Test sessions for the kernl monorepo. Run ``nox -l`` to list them.

CPU sessions run the real Triton kernels through Triton's interpreter (no GPU needed); the ``gpu``
session runs the same tests on CUDA tensors with more hypothesis examples, then the benchmarks.
"""

import os

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.default_venv_backend = "venv"

PACKAGES = ["common", "layernorm", "matmul", "flash_attention", "linear_act", "integration"]
# The CPU sessions pin torch to the release this project's CPU machines carry as a local wheel;
# KERNL_TORCH overrides it (e.g. KERNL_TORCH="torch>=2.11").
TORCH = os.environ.get("KERNL_TORCH", "torch==2.13.0")
TEST_DEPS = ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6.100", "numpy<2.3"]
CPU_ENV = {"KERNL_TEST_DEVICE": "cpu", "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}


def _install(session: nox.Session, packages: list[str]) -> None:
    # Regular (not editable) installs: the packages refer to their siblings by file URL, which pip
    # cannot reconcile with an editable install of the same sibling. pip's output is shown (silent=False):
    # a first run installs for a minute or more, which would otherwise look like a hang.
    session.install(*[f"./packages/{pkg}[test]" for pkg in packages], *TEST_DEPS, silent=False)


def _pytest(session: nox.Session, paths: list[str], env: dict[str, str]) -> None:
    session.run("python", "-m", "pytest", *paths, *session.posargs, env=env)


@nox.session
def tests(session: nox.Session) -> None:
    """CPU test suite of every package, kernels through Triton's interpreter (what CI runs)."""
    session.install(TORCH, silent=False)
    _install(session, PACKAGES)
    # two workers on two cores: one torch thread each (torch's default of one per core would oversubscribe)
    env = {**CPU_ENV, "OMP_NUM_THREADS": "1"}
    _pytest(session, ["-n", "2", "testing/tests", *[f"packages/{p}/tests" for p in PACKAGES]], env)


def _package_session(package: str):
    def run(session: nox.Session) -> None:
        session.install(TORCH, silent=False)
        _install(session, [package] if package != "integration" else PACKAGES)
        _pytest(session, [f"packages/{package}/tests"], CPU_ENV)

    run.__doc__ = f"CPU tests of kernl.{package} alone (interpreter)."
    return run


for _package in PACKAGES:
    nox.session(name=_package)(_package_session(_package))


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check over the whole tree."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(venv_params=["--system-site-packages"])
def gpu(session: nox.Session) -> None:
    """On a CUDA machine: the same tests on CUDA tensors (bf16 too, more examples), then the benchmarks.

    Uses the machine's own CUDA build of torch (system site packages).
    """
    _install(session, PACKAGES)
    session.run("bash", "testing/gpu_suite.sh", *session.posargs, external=True)
