"""Shared fixtures. Tests that need ../shared/data or the cross tools skip with a reason saying so."""
from __future__ import annotations

import shutil

import pytest

from base.data import data_dir


@pytest.fixture(scope="session")
def shared_data():
    d = data_dir(required=False)
    if d is None:
        pytest.skip("shared data folder not found: set $TINYSHIELD_DATA or put it at ../shared/data")
    return d


@pytest.fixture(scope="session")
def arm_toolchain():
    missing = [t for t in ("arm-none-eabi-gcc", "qemu-system-arm") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: run `make setup` (installs the Debian packages)")


@pytest.fixture
def build_tmp(tmp_path, monkeypatch):
    """An isolated artefact cache, so tests never reuse or pollute build/."""
    monkeypatch.setenv("TINYSHIELD_BUILD", str(tmp_path / "build"))
    return tmp_path / "build"


@pytest.fixture(scope="module")
def module_build(tmp_path_factory):
    """A folder for one test module, with the artefact cache at <folder>/build for the module's duration."""
    root = tmp_path_factory.mktemp("module")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYSHIELD_BUILD", str(root / "build"))
        yield root


@pytest.fixture(scope="module")
def one_thread():
    """Small models and single-token decoding gain nothing from threads; on a busy machine they only spin."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
