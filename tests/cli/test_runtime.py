"""The run facts every layer reads: the per-step seeding must leave torch's generators as torch.manual_seed does."""

from __future__ import annotations

import pytest
import torch

from cli.runtime import seed_torch, step_seed


def test_seed_torch_leaves_every_generator_as_manual_seed_does():
    for seed in (0, 12345, step_seed(7, 230, 1)):
        seed_torch(seed)
        ours = torch.get_rng_state(), torch.initial_seed(), torch.rand(4), torch.randn(2, 3)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        torch.manual_seed(seed)
        theirs = torch.get_rng_state(), torch.initial_seed(), torch.rand(4), torch.randn(2, 3)
        assert torch.equal(ours[0], theirs[0]) and ours[1] == theirs[1] == seed
        assert torch.equal(ours[2], theirs[2]) and torch.equal(ours[3], theirs[3])
        if cuda is not None:
            torch.manual_seed(seed)
            assert all(torch.equal(a, b) for a, b in zip(cuda, torch.cuda.get_rng_state_all(), strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seed_torch_on_a_started_cuda_runtime_seeds_it_at_once():
    torch.zeros(1, device="cuda")  # starts the runtime
    seed_torch(99)
    a = torch.rand(3, device="cuda")
    torch.manual_seed(99)
    assert torch.equal(a, torch.rand(3, device="cuda"))
