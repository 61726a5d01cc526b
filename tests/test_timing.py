"""Stage 05's CPU timing protocol (pipeline/timing.py), driven by a fake clock so order and flags are exact."""

from __future__ import annotations

import pytest
import torch

from pipeline.timing import (
    choose_threads,
    interleaved_forward_latency,
    interleaved_times,
    paired_ratios,
    summarize,
    timing_flags,
)


class FakeMachine:
    """A clock that advances only when a timed function "runs": ``cost[name] * load`` seconds per call, where
    ``load`` is the machine's business at that moment (``busy[k]`` for the k-th call overall, else 1)."""

    def __init__(self, cost: dict[str, float], busy: dict[int, float] | None = None):
        self.now, self.calls, self.cost, self.busy = 0.0, [], cost, busy or {}

    def clock(self) -> float:
        return self.now

    def fn(self, name: str):
        def call():
            self.now += self.cost[name] * self.busy.get(len(self.calls), 1.0)
            self.calls.append(name)
        return call


def test_repeats_are_interleaved_round_robin_with_rotating_start():
    m = FakeMachine({"dense": 0.010, "pruned": 0.005, "distilled": 0.005})
    times = interleaved_times({n: m.fn(n) for n in m.cost}, warmup=2, repeats=4, clock=m.clock)
    warm = ["dense", "pruned", "distilled"] * 2
    rounds = [["dense", "pruned", "distilled"], ["pruned", "distilled", "dense"],
              ["distilled", "dense", "pruned"], ["dense", "pruned", "distilled"]]
    assert m.calls == warm + [n for r in rounds for n in r]
    assert times["dense"] == pytest.approx([10.0] * 4) and times["pruned"] == pytest.approx([5.0] * 4)


def test_a_busy_spell_hits_every_model_alike_and_is_flagged():
    # the machine is 3x slower for the whole of the third round (calls 6, 7, 8 after 3 warm-up calls)
    m = FakeMachine({"dense": 0.010, "pruned": 0.005, "distilled": 0.005}, busy={9: 3.0, 10: 3.0, 11: 3.0})
    times = interleaved_times({n: m.fn(n) for n in m.cost}, warmup=1, repeats=5, clock=m.clock)
    for name, per_call in (("dense", 10.0), ("pruned", 5.0), ("distilled", 5.0)):
        assert times[name][2] == pytest.approx(3 * per_call)  # the same round, for every model
        assert timing_flags(times[name], None) == ["spread"]
    # paired within rounds, the speed-up did not move: no ratio flag
    assert paired_ratios(times["dense"], times["pruned"]) == pytest.approx([2.0] * 5)
    assert timing_flags(times["pruned"], times["dense"]) == ["spread"]


def test_flags_of_steady_and_of_unstable_figures():
    dense = [10.0, 10.4, 10.1, 10.2, 10.0]
    assert timing_flags(dense, None) == []
    assert timing_flags([5.0, 5.1, 5.2, 5.0, 5.1], dense) == []
    # one model hit alone by a busy spell (as timing one model after another allows): both flags
    assert timing_flags([5.0, 15.0, 5.0, 5.1, 5.0], dense) == ["spread", "ratio"]
    # steady repeats whose ratio to dense still swings (dense slow at other moments): ratio only
    assert timing_flags([5.0, 5.0, 5.0, 5.0, 5.0], [5.0, 9.0, 5.0, 9.0, 7.0], max_spread=0.5) == ["ratio"]
    s = summarize([1.0, 2.0, 3.0, 4.0, 10.0])
    assert (s["min_ms"], s["q1_ms"], s["median_ms"], s["q3_ms"], s["max_ms"]) == (1.0, 2.0, 3.0, 4.0, 10.0)
    assert s["rel_spread"] == pytest.approx(3.0)


@pytest.mark.parametrize(("ms", "jitter_at", "expect"), [
    ({1: 10, 2: 5}, None, 2),  # an idle machine: all cores faster and steady
    ({1: 10, 2: 5}, 2, 1),  # all cores faster but jittery
    ({1: 10, 2: 80}, 1, 1),  # oversubscribed: all cores steadier but 8x slower (as measured here)
    ({1: 10, 2: 80}, None, 1),
])
def test_thread_count_is_steady_and_not_slowed_by_contention(ms, jitter_at, expect):
    state = {"threads": None, "set": [], "n": 0}
    now = [0.0]

    def set_threads(n):
        state["threads"] = n
        state["set"].append(n)

    def probe():  # ms[threads] per call; at `jitter_at` threads every second call takes 3x
        state["n"] += 1
        slow = state["threads"] == jitter_at and state["n"] % 2 == 0
        now[0] += ms[state["threads"]] / 1e3 * (3 if slow else 1)

    out = choose_threads(probe, warmup=1, repeats=4, candidates=[1, 2], clock=lambda: now[0], set_threads=set_threads)
    assert out["threads"] == expect and state["set"][-1] == expect  # torch left at the chosen count
    assert out["candidates"][1]["median_ms"] == pytest.approx(ms[1] * (2 if jitter_at == 1 else 1))
    if jitter_at:
        assert out["candidates"][jitter_at]["rel_spread"] > 0.9


def test_interleaved_forward_latency_on_real_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    models = {"dense": LlamaForCausalLM(cfg).eval(), "pruned": LlamaForCausalLM(cfg).eval()}
    out = interleaved_forward_latency(models, 64, [1, 2], [8], warmup=1, repeats=3)
    for name in models:
        assert set(out[name]) == {"b1_t8", "b2_t8"}
        for row in out[name].values():
            assert len(row["times_ms"]) == 3 and row["latency_min_ms"] <= row["latency_ms"] <= row["latency_max_ms"]
            assert isinstance(row["flags"], list)
            assert row["tokens_per_s"] == pytest.approx(row["batch"] * 8 / (row["latency_ms"] / 1e3))
