import pytest
import torch

import steer

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    """2-layer random Llama with a byte tokenizer and a ChatML template."""
    return steer.load("tiny-llama")


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (dequantized once, then read from the cache)."""
    return steer.load()
