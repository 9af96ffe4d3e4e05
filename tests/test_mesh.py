"""Sharded trees on simulated meshes (8 CPU devices, conftest): transforms under `jit` with no
host copies, and layers served quantized, against the one-device results."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxquant as jq
from jaxquant import transforms
from jaxquant.apps.models import llama
from jaxquant.flax import quantize_model

MESHES = [(1, 8), (2, 4), (8, 1)]
W8A8 = [jq.Rule(".*", weight="int8", act="int8:token")]


def make_mesh(shape, explicit: bool = False):
  kind = AxisType.Explicit if explicit else AxisType.Auto
  return jax.make_mesh(shape, ("data", "model"), axis_types=(kind, kind))


def _tree():
  rng = np.random.default_rng(0)
  normal = lambda *s: rng.normal(size=s).astype(np.float32)
  return {
    "col": {"kernel": normal(64, 32), "bias": normal(32)},
    "row": {"kernel": normal(32, 64)},
    "both": {"kernel": normal(64, 64)},
  }


SPECS = {
  "col": {"kernel": P(None, "model"), "bias": P("model")},
  "row": {"kernel": P("model", None)},
  "both": {"kernel": P("data", "model")},
}


def _place(tree, mesh):
  shardings = jax.tree.map(
    lambda s: NamedSharding(mesh, s), SPECS, is_leaf=lambda x: isinstance(x, P)
  )
  return jax.device_put(tree, shardings)


def _same_qarray(a: jq.QArray, b: jq.QArray) -> None:
  np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
  np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
  if a.zero_point is not None:
    np.testing.assert_array_equal(np.asarray(a.zero_point), np.asarray(b.zero_point))


def _one_device(tree, rules):
  """The reference: `quantize_params` on one device (jitted; eager agrees to the bit)."""
  return jax.jit(lambda p: jq.quantize_params(p, rules))(tree)


# --------------------------------------------------------------------------- transforms
@pytest.mark.parametrize(
  "shape, spec, explicit",
  [((1, 8), "int4:g16:asym", False), ((2, 4), "int4:g16:asym", True), ((8, 1), "int8", False)],
)
def test_quantize_sharded_is_bitwise_the_one_device_result(shape, spec, explicit):
  mesh = make_mesh(shape, explicit)
  tree, rules = _tree(), [jq.Rule(".*", weight=spec)]
  placed = _place(tree, mesh)
  with jax.transfer_guard("disallow"):  # no host -> device copy either
    got = transforms.quantize_sharded(placed, rules)
  want = _one_device(tree, rules)
  for name, spec_ in SPECS.items():
    q, kernel = got[name]["kernel"], placed[name]["kernel"]
    _same_qarray(q, want[name]["kernel"])
    target = jq.qarray_sharding(q, NamedSharding(mesh, spec_["kernel"]))
    assert q.values.sharding.is_equivalent_to(target.values, q.values.ndim)
    assert q.scale.sharding.is_equivalent_to(target.scale, q.scale.ndim)
    # every device holds its 1/N share of the codes, as it held of the kernel
    per_device = {s.data.nbytes for s in q.values.addressable_shards}
    kernel_share = {s.data.nbytes for s in kernel.addressable_shards}
    ratio = q.values.nbytes / kernel.nbytes
    assert per_device == {int(b * ratio) for b in kernel_share}
  assert got["col"]["bias"].sharding.is_equivalent_to(placed["col"]["bias"].sharding, 1)


@pytest.mark.parametrize("shape", [(2, 4)])
def test_transforms_trace_under_jit_on_sharded_trees(shape):
  """Traced values cannot reach the host (`np.asarray` of a tracer raises): under `jit` the
  transforms read shapes only, and the results stay sharded and equal one device's."""
  mesh = make_mesh(shape)
  tree, rules = _tree(), [jq.Rule(".*", weight="int4:g16")]
  placed = _place(tree, mesh)
  out = transforms.quantized_shardings(placed, rules)
  with jax.transfer_guard("disallow"):
    q = jax.jit(lambda p: jq.quantize_params(p, rules), out_shardings=out)(placed)
    back = jax.jit(jq.dequantize_params, out_shardings=transforms.param_shardings(placed))(q)
    fake = jax.jit(lambda p: jq.fake_quant_params(p, rules))(placed)
    assert jq.plan(placed, rules).to_dict() == jq.plan(tree, rules).to_dict()
  want = _one_device(tree, rules)
  for name in SPECS:
    _same_qarray(q[name]["kernel"], want[name]["kernel"])
    ref = np.asarray(jq.dequantize(want[name]["kernel"]))
    np.testing.assert_array_equal(np.asarray(back[name]["kernel"]), ref)
    np.testing.assert_array_equal(np.asarray(fake[name]["kernel"]), ref)
    sharding = placed[name]["kernel"].sharding
    assert back[name]["kernel"].sharding.is_equivalent_to(sharding, 2)
    assert fake[name]["kernel"].sharding.is_equivalent_to(sharding, 2)


def test_eager_checks_bring_back_flags_not_weights(monkeypatch):
  """`quantize_sharded` checks finiteness and scale ranges on the devices: what it fetches is
  a few bytes per leaf, and a NaN in one shard still names its path."""
  mesh = make_mesh((2, 4))
  placed = _place(_tree(), mesh)
  fetched: list[int] = []
  real_get = jax.device_get

  def counting_get(x):
    out = real_get(x)
    fetched.extend(np.asarray(a).nbytes for a in jax.tree.leaves(out))
    return out

  monkeypatch.setattr(jax, "device_get", counting_get)
  transforms.quantize_sharded(placed, [jq.Rule(".*", weight="int8:g16:scale=f16")])
  assert fetched and max(fetched) <= 8
  bad = dict(placed, row={"kernel": placed["row"]["kernel"].at[3, 5].set(jnp.nan)})
  with pytest.raises(ValueError, match="row/kernel: contains 1 NaN"):
    transforms.quantize_sharded(bad, [jq.Rule(".*", weight="int8")])


def _device0_bytes(tree) -> int:
  return sum(
    next(s.data.nbytes for s in a.addressable_shards if s.device.id == 0)
    for a in jax.tree.leaves(tree)
  )


def test_memory_per_device_is_its_share():
  """Compiled for 8 devices: each device's arguments and outputs are exactly its shards, and
  its scratch space stays under its share of one kernel in float32."""
  mesh = make_mesh((2, 4))
  placed = _place(_tree(), mesh)
  rules = [jq.Rule(".*", weight="int8")]
  out = transforms.quantized_shardings(placed, rules)
  compiled = jax.jit(lambda p: jq.quantize_params(p, rules), out_shardings=out)
  executable = compiled.lower(placed).compile()
  stats = executable.memory_analysis()
  q = compiled(placed)
  hlo = executable.as_text()  # no resharding: only the scales' max over the split input axis
  assert "all-gather" not in hlo and "all-to-all" not in hlo and "collective-permute" not in hlo
  assert re.search(r"f32\[\d+\]\S* all-reduce\(", hlo)  # per-column max over the devices
  assert stats.argument_size_in_bytes == _device0_bytes(placed)
  n_out = len(jax.tree.leaves(q))  # plus one pointer per output in the result tuple
  assert _device0_bytes(q) <= stats.output_size_in_bytes <= _device0_bytes(q) + 8 * n_out
  assert _device0_bytes(placed) < transforms.tree_nbytes(placed) / 4 + 256
  assert stats.temp_size_in_bytes <= max(
    a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(placed)
  )


# --------------------------------------------------------------------------- boxes
class _MLP(nn.Module):
  """Column-parallel up projection, row-parallel down projection (logical axis names)."""

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    up = nn.Dense(64, kernel_init=nn.with_partitioning(init, ("embed", "mlp")), name="up")
    down = nn.Dense(32, kernel_init=nn.with_partitioning(init, ("mlp", "embed")), name="down")
    return down(nn.relu(up(x)))


AXIS_RULES = (("embed", None), ("mlp", "model"))


def _int8_dots(hlo: str) -> list[str]:
  """The ``s8 × s8 -> s32`` dots of a compiled HLO module (operand types looked up by name
  within each computation)."""
  dots, types = [], {}
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      types = {}  # a new computation: its own names
    found = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[", line)
    if found:
      types[found.group(1)] = found.group(2)
    m = re.search(r"= s32\[[^\]]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
    if m and types.get(m.group(1)) == "s8" and types.get(m.group(2)) == "s8":
      dots.append(line.strip())
  return dots


def test_partitioned_boxes_are_kept_and_give_the_shardings():
  mesh = make_mesh((2, 4))
  x = jax.random.normal(jax.random.key(1), (8, 4, 32))
  params = _MLP().init(jax.random.key(0), x)["params"]
  q = jq.quantize_params(params, W8A8)
  box = q["up"]["kernel"]
  assert isinstance(box, nn.Partitioned) and box.names == ("embed", "mlp")
  assert isinstance(box.value, jq.QArray)
  with nn.logical_axis_rules(AXIS_RULES):
    assert nn.get_partition_spec(q)["up"]["kernel"] == P("embed", "mlp")
  shardings = transforms.param_shardings(q, mesh, AXIS_RULES)
  up, down = shardings["up"]["kernel"].value, shardings["down"]["kernel"].value
  assert up.values.spec == P(None, "model") and up.scale.spec == P(None, "model")
  assert down.values.spec == P("model", None) and down.scale.spec == P(None, None)
  placed = jax.device_put(q, shardings)
  assert placed["down"]["kernel"].value.values.sharding.spec == P("model", None)
  # the float tree's boxes give the quantized tree's shardings before any work
  expect = transforms.quantized_shardings(
    jax.device_put(params, transforms.param_shardings(params, mesh, AXIS_RULES)), W8A8
  )
  assert jax.tree.leaves(expect) == jax.tree.leaves(shardings)


@pytest.mark.parametrize("shape", MESHES)
def test_column_and_row_parallel_dense_serve_like_one_device(shape):
  mesh = make_mesh(shape)
  x = jax.random.normal(jax.random.key(1), (8, 16, 32))  # 128 rows: XLA's own integer dot
  params = _MLP().init(jax.random.key(0), x)["params"]
  q = jq.quantize_params(params, W8A8)
  served = jax.jit(quantize_model(_MLP(), W8A8).apply)
  want = served({"params": q}, x)
  placed = jax.device_put(q, transforms.param_shardings(q, mesh, AXIS_RULES))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  compiled = served.lower({"params": placed}, xs).compile()
  got = compiled({"params": placed}, xs)
  # integer partial sums of the row-parallel layer are all-reduced as s32: exact
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  hlo = compiled.as_text()
  dots = _int8_dots(hlo)
  assert len(dots) == 2, dots
  if shape[1] > 1:
    assert re.search(r"s32\[[\d,]+\][^ ]* all-reduce\(", hlo)


def test_nnx_sharding_metadata_is_kept_and_gives_the_shardings():
  mesh = make_mesh((2, 4))
  init = nnx.initializers.lecun_normal()
  with jax.set_mesh(mesh):
    layer = nnx.Linear(
      32, 64, kernel_init=nnx.with_partitioning(init, (None, "model")), rngs=nnx.Rngs(0)
    )
  state = nnx.state(layer)
  q = jq.quantize_params(state, [jq.Rule(".*", weight="int8")])
  kernel = q["kernel"]
  assert isinstance(kernel, nnx.Param) and isinstance(kernel.get_value(), jq.QArray)
  assert kernel.get_metadata()["out_sharding"] == (None, "model")
  shardings = transforms.param_shardings(q, mesh)
  assert shardings["kernel"].get_value().values.spec == P(None, "model")
  assert shardings["kernel"].get_value().scale.spec == P(None, "model")
  qsharded = transforms.quantize_sharded(state, [jq.Rule(".*", weight="int8")])
  assert qsharded["kernel"].get_value().values.sharding.spec == P(None, "model")
  _same_qarray(qsharded["kernel"].get_value(), kernel.get_value())


# --------------------------------------------------------------------------- the LLM
def _llama_shardings(q, mesh):
  """Megatron-style: q/k/v/gate/up split by output, o/down by input, the rest replicated."""

  def spec(path: str):
    if re.search(r"(q|k|v|gate|up)_proj/kernel$", path):
      return P(None, "model")
    if re.search(r"(o|down)_proj/kernel$", path):
      return P("model", None)
    return P()

  return transforms.map_leaves(
    lambda path, v: (
      transforms.param_shardings(v, mesh)
      if not isinstance(v, jq.QArray)
      else jq.qarray_sharding(v, NamedSharding(mesh, spec(path)))
    ),
    q,
  )


@pytest.mark.slow  # about 25 s on two shared cores: most of it compiling the served model twice
def test_llama_served_w8a8_on_a_2x4_mesh_gives_the_one_device_logits():
  cfg = llama.LlamaConfig(vocab=64, dim=32, layers=1, heads=4, kv_heads=2, head_dim=8, mlp=64)
  model = llama.Llama(cfg)
  tokens = jax.random.randint(jax.random.key(2), (8, 16), 0, cfg.vocab)
  params = model.init(jax.random.key(0), tokens)["params"]
  rules = [jq.Rule(r"(^|/)embed_tokens/", weight=None), *W8A8]
  q = _one_device(params, rules)
  served = jax.jit(quantize_model(model, rules).apply)
  want = served({"params": q}, tokens)
  mesh = make_mesh((2, 4))
  placed = jax.device_put(q, _llama_shardings(q, mesh))
  ts = jax.device_put(tokens, NamedSharding(mesh, P("data")))
  compiled = served.lower({"params": placed}, ts).compile()
  got = compiled({"params": placed}, ts)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  assert len(_int8_dots(compiled.as_text())) >= 7  # q, k, v, o, gate, up, down


def test_weight_only_dense_serves_close_to_one_device():
  """Weight-only int4: the row-parallel layer sums float partial products per device, then
  across devices, in another order than one device does: equal to float32 rounding."""
  mesh = make_mesh((2, 4))
  rules = [jq.Rule(".*", weight="int4:g16")]
  x = jax.random.normal(jax.random.key(1), (8, 16, 32))
  params = _MLP().init(jax.random.key(0), x)["params"]
  q = jq.quantize_params(params, rules)
  served = jax.jit(quantize_model(_MLP(), rules).apply)
  want = served({"params": q}, x)
  placed = jax.device_put(q, transforms.param_shardings(q, mesh, AXIS_RULES))
  got = served({"params": placed}, jax.device_put(x, NamedSharding(mesh, P("data"))))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert placed["down"]["kernel"].value.values.sharding.spec == P("model", None)
