"""The interleaved timer the benchmarks share."""

import jax.numpy as jnp

from jaxquant.apps.bench import time_interleaved


def test_time_interleaved_runs_every_call_each_round_and_reports_medians():
  order = []
  calls = {name: (lambda name=name: order.append(name) or jnp.ones(3)) for name in ("a", "b")}
  wall, cpu = time_interleaved(calls, rounds=3, warmup=2)
  assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-up, then interleaved rounds
  assert set(wall) == set(cpu) == {"a", "b"}
  assert all(t >= 0 for t in (*wall.values(), *cpu.values()))
