"""The compiled CPU kernels (XLA FFI) against plain NumPy, and their place in the lowerings."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import export

import jaxquant as jq
import jaxquant.export
from jaxquant import flax as jqf
from jaxquant import ops
from jaxquant.ops import cpu_kernels as ck
from jaxquant.qarray import codes

built = pytest.mark.skipif(not ck.available(), reason=ck.unavailable_reason())
DENSE = (((1,), (0,)), ((), ()))


def _np_dequantize(q) -> np.ndarray:
  """``(codes − z) · s`` in float64, group scales repeated along K."""
  c = np.asarray(codes(q), np.float64)
  k, n = c.shape

  def full(t):
    t = np.asarray(t, np.float64).reshape(-1, np.shape(t)[-1])
    t = np.broadcast_to(t, (t.shape[0], n))
    return np.repeat(t, k // t.shape[0], axis=0)

  z = full(q.zero_point) if q.zero_point is not None else 0.0
  return (c - z) * full(q.scale)


SPECS = ["int8", "int8:asym", "int4", "int4:asym", "uint4:g32", "int4:g16", "int4:g64:asym"]
# every code path this CPU runs (AVX-512 ones only where it has them), each checked alone
PATHS = ck.ISAS[: ck.ISAS.index(ck.isa()) + 1] if ck.available() else ("scalar",)


def _on_path(isa: str, fn):
  """`fn()` with the kernels capped at code path `isa`, the cap lifted afterwards."""
  ck.set_isa(isa)
  try:
    return fn()
  finally:
    ck.set_isa("avx512")


@built
@settings(max_examples=8, deadline=None)
@given(
  spec=st.sampled_from(SPECS),
  m=st.integers(1, 9),
  groups=st.integers(1, 4),
  n=st.sampled_from([1, 5, 16, 33, 48, 70, 96]),
  seed=st.integers(0, 2**16),
  isa=st.sampled_from(PATHS),
)
def test_weight_only_kernel_equals_numpy(spec, m, groups, n, seed, isa):
  k = 64 * groups
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(k, n)).astype(np.float32)
  x = rng.normal(size=(m, k)).astype(np.float32)
  q = jq.quantize(jnp.asarray(w), spec)
  assert ck.weight_only_reason(q) is None
  y = _on_path(isa, lambda: ck.weight_only_matmul(jnp.asarray(x), q, lambda: jnp.zeros((m, n))))
  ref = x.astype(np.float64) @ _np_dequantize(q)
  bound = np.abs(x).astype(np.float64) @ np.abs(_np_dequantize(q))  # float32 summation error
  assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= 1e-5 * bound + 1e-6)


@built
@settings(max_examples=8, deadline=None)
@given(
  m=st.integers(1, 9),
  k=st.integers(1, 130),
  n=st.sampled_from([1, 7, 16, 40, 64, 150]),
  seed=st.integers(0, 2**16),
  isa=st.sampled_from(PATHS),
)
def test_int8_kernel_is_exact(m, k, n, seed, isa):
  rng = np.random.default_rng(seed)
  a = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
  q = jq.quantize(jnp.asarray(rng.normal(size=(k, n)).astype(np.float32)), "int8")
  s_a = rng.uniform(0.01, 1.0, size=(m,)).astype(np.float32)
  y = _on_path(
    isa, lambda: ck.int8_matmul(jnp.asarray(a), jnp.asarray(s_a), q, lambda: jnp.zeros((m, n)))
  )
  acc = a.astype(np.int64) @ np.asarray(codes(q), np.int64)  # exact
  s_w = np.asarray(q.scale, np.float32).reshape(-1)
  ref = (acc.astype(np.float32) * s_a[:, None]) * s_w[None, :]
  np.testing.assert_array_equal(np.asarray(y), ref)


@built
def test_default_serve_path_takes_the_kernels_and_says_so():
  w = jax.random.normal(jax.random.key(0), (256, 96))
  x = jax.random.normal(jax.random.key(1), (2, 2, 256))  # 4 rows: W8A8 takes the kernel too
  dims = (((2,), (0,)), ((), ()))
  for spec, act, target in [
    ("int4:g64", None, ck.WQ_TARGET),
    ("int8", None, ck.WQ_TARGET),
    ("int8", "int8:token", ck.INT8_TARGET),
  ]:
    q = jq.quantize(w, spec)
    chosen = ops.explain(x, q, dims, act)
    assert chosen.name == "kernel" and target in chosen.reason
    f = jax.jit(lambda x, q, act=act: ops.qdot_general(x, q, dims, lhs_spec=act))
    assert f'custom_call_target="{target}"' in f.lower(x, q).compile().as_text()
    with ops.lowering_scope(kernels=False):
      xla = ops.qdot_general(x, q, dims, lhs_spec=act)
    scale = float(np.abs(np.asarray(xla)).max())  # float32 sums in another order
    np.testing.assert_allclose(np.asarray(f(x, q)), np.asarray(xla), rtol=0, atol=1e-5 * scale)
  # ineligible weights keep the XLA lowerings; forcing the kernel says why it cannot
  nf4 = jq.quantize(w, "nf4:g64")
  assert ops.explain(x, nf4, dims).name == "dequant"
  with pytest.raises(ValueError, match=r"kernel.*nf4"):
    ops.explain(x, nf4, dims, lowering="kernel")
  with pytest.raises(ValueError, match=r"kernel.*multiples of 128"):  # the TPU kernel's limits
    ops.explain(x, jq.quantize(w, "int8"), dims, lowering="kernel", backend="tpu")
  # XLA cannot partition the kernels: under a mesh the XLA lowerings serve
  with jax.set_mesh(jax.make_mesh((2, 4), ("data", "model"))):
    assert ops.explain(x, jq.quantize(w, "int8"), dims).name == "dequant"
    with pytest.raises(ValueError, match="mesh"):
      ops.explain(x, jq.quantize(w, "int8"), dims, lowering="kernel")
  # many rows go back to XLA's own dots
  many = jax.ShapeDtypeStruct((ops.lowerings.KERNEL_MAX_ROWS + 1, 256), jnp.float32)
  assert ops.explain(many, jq.quantize(w, "int8"), DENSE).name != "kernel"


@built
def test_kernels_under_vmap_and_in_flax_serving():
  w = jax.random.normal(jax.random.key(0), (128, 48))
  q = jq.quantize(w, "int4:g32")
  xs = jax.random.normal(jax.random.key(1), (3, 2, 128))
  f = lambda x: ops.qdot_general(x, q, DENSE)
  batched = jax.jit(jax.vmap(f))(xs)
  np.testing.assert_allclose(
    np.asarray(batched), np.asarray(xs @ jq.dequantize(q)), rtol=1e-5, atol=1e-5
  )
  # the documented path: quantize_params, then a serve model; no layout call
  model = nn.Dense(48)
  params = model.init(jax.random.key(2), xs[0])["params"]
  rules = [jq.Rule(r".*kernel", weight="int4:g32")]
  served = jqf.quantize_model(model, rules, mode="serve")
  variables = {"params": jq.quantize_params(params, rules)}
  assert ck.WQ_TARGET in jax.jit(served.apply).lower(variables, xs[0]).as_text()
  np.testing.assert_allclose(
    np.asarray(served.apply(variables, xs[0])),
    np.asarray(model.apply({"params": jq.dequantize_params(variables["params"])}, xs[0])),
    rtol=1e-5,
    atol=1e-5,
  )


def test_export_for_every_platform_stays_pure_xla_off_cpu():
  q = jq.quantize(jax.random.normal(jax.random.key(0), (128, 32)), "int4:g32")
  x = jax.ShapeDtypeStruct((4, 128), jnp.float32)
  f = jax.jit(lambda x, q: ops.qdot_general(x, q, DENSE))
  checks = [export.DisabledSafetyCheck.custom_call(t) for t in (ck.WQ_TARGET, ck.INT8_TARGET)]
  exported = export.export(f, platforms=("cpu", "cuda", "tpu"), disabled_checks=checks)(x, q)
  assert exported.platforms == ("cpu", "cuda", "tpu")
  for platform in ("cuda", "tpu"):
    text = export.export(f, platforms=(platform,), disabled_checks=checks)(x, q).mlir_module()
    assert ck.WQ_TARGET not in text
  # jaxquant.export traces without the kernels: a portable artifact
  art = jaxquant.export.lower(lambda v, x: ops.qdot_general(x, v, DENSE), q, [x])
  assert ck.WQ_TARGET not in art.mlir_module()


def test_without_the_compiled_kernels_everything_takes_xla():
  code = (
    "import jax, jaxquant as jq\n"
    "from jaxquant import ops\n"
    "from jaxquant.ops import cpu_kernels as ck\n"
    "q = jq.quantize(jax.random.normal(jax.random.key(0), (64, 16)), 'int4:g32')\n"
    "x = jax.random.normal(jax.random.key(1), (1, 64))\n"
    "assert not ck.available() and 'JAXQUANT_CPU_KERNELS' in ck.unavailable_reason()\n"
    "assert ops.explain(x, q).name == 'dequant'\n"
    "y = ops.qdot_general(x, q, (((1,), (0,)), ((), ())))\n"
    "assert abs(y - x @ jq.dequantize(q)).max() < 1e-4\n"
    "print('ok')\n"
  )
  env = dict(os.environ, JAXQUANT_CPU_KERNELS="0")
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@built
@pytest.mark.parametrize("isa", PATHS)
def test_every_code_path_on_a_layer_the_width_of_its_tiles(isa):
  """Shapes that fill the AVX-512 tiles (32 / 64 columns) with odd tails, on each path."""
  rng = np.random.default_rng(7)
  k, n = 260, 64 * 3 + 16 + 5  # VNNI tiles, an AVX2 tile, single columns; K not a multiple of 4
  w = rng.normal(size=(k, n)).astype(np.float32)
  for m in (1, 3, 6):
    a = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    q8 = jq.quantize(jnp.asarray(w), "int8")
    y = _on_path(isa, lambda: ck.int8_matmul(jnp.asarray(a), jnp.ones((m,)), q8, None))
    acc = a.astype(np.int64) @ np.asarray(codes(q8), np.int64)
    ref = acc.astype(np.float32) * np.asarray(q8.scale, np.float32).reshape(1, -1)
    np.testing.assert_array_equal(np.asarray(y), ref)
    x = rng.normal(size=(m, k - 4)).astype(np.float32)
    q4 = jq.quantize(jnp.asarray(w[: k - 4]), "int4:g32:asym")
    y4 = _on_path(isa, lambda: ck.weight_only_matmul(jnp.asarray(x), q4, None))
    ref4 = x.astype(np.float64) @ _np_dequantize(q4)
    bound = np.abs(x).astype(np.float64) @ np.abs(_np_dequantize(q4))
    assert np.all(np.abs(np.asarray(y4, np.float64) - ref4) <= 1e-5 * bound + 1e-6)


@built
def test_set_isa_names_the_paths_and_refuses_others():
  assert ck.isa() in ck.ISAS
  assert _on_path("avx2", ck.isa) in ("scalar", "avx2")
  assert ck.isa() == PATHS[-1]  # the cap is lifted again
  with pytest.raises(ValueError, match="choose one of"):
    ck.set_isa("avx1024")
