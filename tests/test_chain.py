"""The driver's fast path (`jaxquant.ptq.chain`): blocks run alone on cached inputs give the
same quantized params as full forwards, models that are not chains fall back, and execution
order is the call order (``layers_2`` before ``layers_10``)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.apps.models import llama
from jaxquant.ptq import CalibrationSet, chain, driver
from jaxquant.ptq.capture import execution_order
from jaxquant.recipes import apply_recipe, load_recipe
from jaxquant.rules import default_rules
from jaxquant.transforms import dequantize_params, named_leaves

CFG = llama.LlamaConfig(vocab=64, dim=64, layers=3, heads=4, kv_heads=2, head_dim=16, mlp=128)


def _tiny():
  model = llama.Llama(CFG, logits=False)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  batches = [(jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32),) for _ in range(2)]
  return model, params, batches


@pytest.mark.slow  # 40 s; experiments/ppl_smollm2.py chains every data-driven recipe on SmolLM2
@pytest.mark.parametrize("recipe", ["w4g64-gptq"])  # AWQ's path: tests/test_ptq.py, MiniLM
def test_chained_blocks_quantize_like_full_forwards(recipe, monkeypatch):
  model, params, batches = _tiny()
  data = CalibrationSet(model, batches, smoothing_groups=llama.smoothing_groups(CFG))
  used = []
  real = driver.chain_blocks
  monkeypatch.setattr(driver, "chain_blocks", lambda *a: used.append(real(*a)) or used[-1])
  fast = apply_recipe(load_recipe(recipe), params, data)
  assert used and used[0] is not None  # the chain was taken
  monkeypatch.setattr(driver, "chain_blocks", lambda *a: None)
  slow = apply_recipe(load_recipe(recipe), params, data)
  a, b = (
    dict(named_leaves(dequantize_params(fast.qparams))),
    dict(named_leaves(dequantize_params(slow.qparams))),
  )
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-5, atol=1e-5, err_msg=k)


class _Skip(nn.Module):
  """Block 1 reads the embedding, not block 0's output: not a chain."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(64, 32, name="embed")(tokens)
    h = nn.Dense(32, name="layers_0")(x)
    return nn.Dense(32, name="layers_1")(x) + h


def test_a_model_whose_blocks_are_not_chained_falls_back():
  model = _Skip()
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  batch = (jnp.arange(8, dtype=jnp.int32).reshape(2, 4),)
  rules = default_rules("int8")
  assert chain.chain_blocks(model, params, rules, [batch], ["layers_0", "layers_1"]) is None
  model, params, batches = _tiny()
  names = [f"layers_{i}" for i in range(CFG.layers)]
  assert chain.chain_blocks(model, params, rules, batches, names) is not None


def test_execution_order_is_the_call_order_not_the_sorted_one():
  cfg = llama.LlamaConfig(vocab=32, dim=32, layers=12, heads=2, kv_heads=1, head_dim=16, mlp=32)
  model = llama.Llama(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  paths = [p for p, _ in named_leaves(params) if p.endswith("kernel")]
  order = execution_order(
    model, params, default_rules("int8"), (jnp.zeros((1, 4), jnp.int32),), paths
  )
  blocks = list(dict.fromkeys(p.split("/")[0] for p in order))
  assert blocks == [f"layers_{i}" for i in range(12)]
  assert order[:4] == [f"layers_0/self_attn/{n}_proj/kernel" for n in "qkvo"]
