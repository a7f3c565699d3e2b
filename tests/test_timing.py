"""Latency is timed interleaved and reported as a speed change a reader cannot misread."""

from __future__ import annotations

import torch

from surgery.timing import Speedup, Timing, time_interleaved


def test_a_slower_model_reads_as_slower() -> None:
    assert Speedup(0.244, 0.24, 0.25, 9).text().startswith("4.10x slower")
    assert Speedup(2.14, 2.1, 2.2, 9).text() == "2.14x faster"


def test_a_wide_spread_is_flagged_not_hidden() -> None:
    steady, busy = Speedup(1.7, 1.65, 1.75, 9), Speedup(1.7, 0.9, 2.4, 9)
    assert not steady.noisy and "noisy" not in steady.text()
    assert busy.noisy and "noisy" in busy.text() and "0.90-2.40x" in busy.text()


def test_models_take_turns_in_alternating_order() -> None:
    calls: list[str] = []

    def tagged(name: str) -> torch.nn.Module:
        layer = torch.nn.Linear(4, 4)
        layer.register_forward_hook(lambda *_: calls.append(name))
        return layer

    samples = time_interleaved({"a": tagged("a"), "b": tagged("b")}, torch.randn(2, 4),
                               rounds=4, warmup=1)
    assert calls == ["a", "b"] + ["a", "b", "b", "a"] * 2
    assert all(len(s) == 4 and min(s) > 0 for s in samples.values())
    timing = Timing.of(samples["a"])
    assert timing.low_ms <= timing.median_ms <= timing.high_ms and timing.rounds == 4
    speed = Speedup.of(samples["a"], samples["b"])
    assert speed.low <= speed.ratio <= speed.high
