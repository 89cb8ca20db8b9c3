"""The tiny MoE the runtime tests share: its config, a text, and module-scoped fixtures for the model and its
store (a test module imports the fixtures it uses; each module gets its own instances)."""
import pytest
import torch

from edge.moe.model import MoEConfig, MoEModel, encode
from edge.moe.store import write_store

CFG = MoEConfig(dim=32, layers=3, heads=2, experts=4, ffn=48, context=48)
TEXT = encode("It was the best of times, it was the worst of times, it was the age of wisdom. " * 3)


@pytest.fixture(scope="module")
def model(one_thread):
    torch.manual_seed(0)
    return MoEModel(CFG).eval()


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    return write_store(model, tmp_path_factory.mktemp("store"))
