import pytest
import torch


@pytest.fixture
def set_threads():
    """torch.set_num_threads for one test (the kernels that split their work over torch's
    intra-op threads must give the same bits with 1 and 2); the number is restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
