import pytest
import torch

from cli.errors import ConfigError
from lightning_modules.nn.buffer import ReservoirBuffer


def test_fills_in_order_until_full():
    buf = ReservoirBuffer(capacity=5, seed=0)
    buf.add(x=torch.arange(3).float().unsqueeze(1), y=torch.arange(3))
    assert len(buf) == 3 and buf.num_seen == 3
    assert buf.data["y"][:3].tolist() == [0, 1, 2]
    buf.add(x=torch.arange(3, 5).float().unsqueeze(1), y=torch.arange(3, 5))
    assert buf.data["y"].tolist() == [0, 1, 2, 3, 4]
    assert buf.data["x"][:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_reservoir_keeps_every_example_with_probability_capacity_over_seen():
    """Algorithm R: after N examples, each is in memory with probability M/N."""
    n, m, trials = 40, 8, 3000
    counts = torch.zeros(n)
    for seed in range(trials):
        buf = ReservoirBuffer(capacity=m, seed=seed)
        for start in range(0, n, 4):
            ids = torch.arange(start, start + 4)
            buf.add(y=ids)
        assert len(buf) == m and len(set(buf.data["y"].tolist())) == m
        counts[buf.data["y"]] += 1
    freq = counts / trials
    expected = m / n  # 0.2; binomial std over 3000 trials is ~0.0073
    assert (freq - expected).abs().max() < 0.035, freq
    # Early and late examples are kept equally often (no recency bias).
    assert abs(freq[: n // 2].mean() - freq[n // 2 :].mean()) < 0.015


def test_sample_is_without_replacement_and_bounded_by_fill():
    buf = ReservoirBuffer(capacity=10, seed=1)
    buf.add(y=torch.arange(6))
    s = buf.sample(100)["y"]
    assert sorted(s.tolist()) == list(range(6))
    s = buf.sample(4)["y"]
    assert len(set(s.tolist())) == 4


def test_state_round_trip_continues_identically():
    a = ReservoirBuffer(capacity=6, seed=3)
    a.add(y=torch.arange(20), x=torch.randn(20, 2))
    b = ReservoirBuffer(capacity=6, seed=99)
    b.load_state_dict(a.state_dict())
    more = {"y": torch.arange(20, 40), "x": torch.randn(20, 2)}
    a.add(**more)
    b.add(**more)
    assert torch.equal(a.data["y"], b.data["y"]) and torch.equal(a.data["x"], b.data["x"])
    assert torch.equal(a.sample(3)["y"], b.sample(3)["y"])


def test_capacity_mismatch_on_load_is_a_clear_error():
    a = ReservoirBuffer(capacity=6)
    a.add(y=torch.arange(3))
    with pytest.raises(ConfigError, match="holds 6 examples per rank"):
        ReservoirBuffer(capacity=4).load_state_dict(a.state_dict())
