"""Pure transforms over parameter pytrees: params in, params out.

Works on Linen ``params`` dicts, plain nested dicts/lists, and NNX `State` (whose leaves are
`nnx.Variable`s; their values are transformed and the Variables kept). Linen partitioning boxes
(``nn.with_partitioning``: `nn.Partitioned`, `nn.LogicallyPartitioned`) are kept the same way,
around the QArray that replaces their value. Paths are the keys joined by '/', e.g.
``encoder/layer_0/attention/self/query/kernel`` (a box adds nothing to the path).

Sharded trees: every transform runs under `jit` on `jax.Array`s sharded over a mesh;
`param_shardings` reads the shardings a (boxed) tree asks for, `quantized_shardings` those of
its quantized form, and `quantize_sharded` quantizes a sharded tree in one `jit` into them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from jaxquant.numerics import check_finite, check_scale_range, dequantize, fake_quant, quantize
from jaxquant.qarray import QArray, qarray_sharding
from jaxquant.rules import Rule, first_match
from jaxquant.spec import QuantSpec, check_group_size

PyTree = Any


# --------------------------------------------------------------------------- paths
def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(keypath) -> str:
  """'/'-joined form of a `jax.tree_util` key path."""
  return "/".join(_key_name(k) for k in keypath)


def _is_leaf(x) -> bool:
  return isinstance(x, (QArray, nnx.Variable, nn.meta.AxisMetadata))


def _unwrap(leaf):
  if isinstance(leaf, nnx.Variable):
    return leaf.get_value()
  if isinstance(leaf, nn.meta.AxisMetadata):
    return leaf.unbox(apply_constraint=False)
  return leaf


def _rewrap(leaf, value):
  if isinstance(leaf, nnx.Variable):
    return leaf.replace(value=value)
  if isinstance(leaf, nn.meta.AxisMetadata):
    return leaf.replace_boxed(value)
  return value


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
  """``[(path, array or QArray)]`` in tree order (NNX Variables unwrapped)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
  return [(path_str(kp), _unwrap(leaf)) for kp, leaf in flat]


def map_leaves(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
  """Applies ``fn(path, value)`` to every leaf value, keeping the tree (and NNX Variables)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
  new = [_rewrap(leaf, fn(path_str(kp), _unwrap(leaf))) for kp, leaf in flat]
  return jax.tree_util.tree_unflatten(treedef, new)


# --------------------------------------------------------------------------- selection
def _nbytes(x) -> int:
  if isinstance(x, QArray):
    return x.nbytes
  return math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize


def tree_nbytes(tree) -> int:
  """Bytes held by a parameter tree, QArrays counted by what they store (no copies made)."""
  return sum(_nbytes(leaf) for _, leaf in named_leaves(tree))


# Leaf names that are never weights of a contraction, whatever their rank (e.g. the 2-D bias
# of a DenseGeneral with two output axes).
_NEVER_QUANTIZED = frozenset({"bias", "scale", "offset", "mean", "var"})


def selection(path: str, value, rules: Sequence[Rule]) -> tuple[int | None, QuantSpec | None, str]:
  """``(rule index, spec to apply or None, note)`` for one leaf: the first matching rule's
  weight spec, unless the leaf is already quantized, not floating, empty (a zero-size axis: no
  values to take a scale from), has fewer than two dimensions (besides the rule's
  `batch_dims`), or is a bias or norm parameter."""
  idx = first_match(path, rules)
  spec = None if idx is None else rules[idx].weight
  if isinstance(value, QArray):
    return idx, None, "already quantized"
  if idx is None or spec is None:
    return idx, None, "no rule" if idx is None else "kept by rule"
  dtype = np.dtype(value.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    return idx, None, f"kept ({dtype.name})"
  if math.prod(np.shape(value)) == 0:
    return idx, None, "kept (zero-size)"
  if np.ndim(value) - rules[idx].batch_dims < 2:
    return idx, None, "kept (<2 dims)"
  if path.rsplit("/", 1)[-1] in _NEVER_QUANTIZED:
    return idx, None, "kept (bias or norm)"
  return idx, spec, ""


@dataclasses.dataclass(frozen=True)
class PlanRow:
  """One leaf of a `Plan`: its spec (None: kept as it is), bytes, and why."""

  path: str
  shape: tuple[int, ...]
  dtype: str
  rule: int | None
  spec: QuantSpec | None
  bytes_before: int
  bytes_after: int
  note: str = ""
  problem: str | None = None
  batch_dims: int = 0


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `quantize_params` would do: one row per leaf, plus the rules that matched nothing."""

  rows: tuple[PlanRow, ...]
  rules: tuple[Rule, ...]
  unused_rules: tuple[Rule, ...]

  @property
  def quantized(self) -> tuple[PlanRow, ...]:
    return tuple(r for r in self.rows if r.spec is not None)

  @property
  def bytes_before(self) -> int:
    return sum(r.bytes_before for r in self.rows)

  @property
  def bytes_after(self) -> int:
    return sum(r.bytes_after for r in self.rows)

  @property
  def problems(self) -> list[str]:
    return [r.problem for r in self.rows if r.problem]

  def check(self) -> None:
    """Raises one ValueError listing every problem (bad group sizes...) before any work."""
    if self.problems:
      raise ValueError("Cannot quantize these parameters:\n  " + "\n  ".join(self.problems))

  def warn_unused(self) -> None:
    for rule in self.unused_rules:
      if not rule.expect_match:
        continue
      warnings.warn(
        f"Rule {rule.pattern!r} matched no parameter (or only parameters an earlier rule "
        "took); check the pattern against the paths that jaxquant.plan(params, rules) lists.",
        UserWarning,
        stacklevel=3,
      )

  def to_dict(self) -> dict:
    return {
      "rows": [
        {
          "path": r.path,
          "shape": list(r.shape),
          "dtype": r.dtype,
          "spec": None if r.spec is None else str(r.spec),
          "bytes_before": r.bytes_before,
          "bytes_after": r.bytes_after,
          "note": r.note,
        }
        for r in self.rows
      ],
      "unused_rules": [r.pattern for r in self.unused_rules],
      "bytes_before": self.bytes_before,
      "bytes_after": self.bytes_after,
    }

  def __str__(self) -> str:
    return self.text()

  def text(self, only_quantized: bool = False) -> str:
    """A plain-text table (path, shape, spec, bytes before and after) and the summary."""
    rows = [
      (
        r.path,
        "×".join(map(str, r.shape)) or "()",
        str(r.spec) if r.spec is not None else (r.note or "-"),
        human_bytes(r.bytes_before),
        human_bytes(r.bytes_after),
      )
      for r in (self.quantized if only_quantized else self.rows)
    ]
    header = ("path", "shape", "spec", "bytes", "quantized")
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    lines = [
      "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
      for line in [header, *rows]
    ]
    return "\n".join(lines + [self.summary()])

  def summary(self) -> str:
    q = self.quantized
    before = sum(r.bytes_before for r in q)
    after = sum(r.bytes_after for r in q)
    lines = [
      f"{len(q)} of {len(self.rows)} tensors quantized: {human_bytes(before)} -> "
      f"{human_bytes(after)} ({after / before:.1%})"
      if before
      else f"0 of {len(self.rows)} tensors quantized",
      f"whole tree: {human_bytes(self.bytes_before)} -> {human_bytes(self.bytes_after)}",
    ]
    lines += [f"rule {r.pattern!r} matched nothing" for r in self.unused_rules if r.expect_match]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
  """``1536`` -> ``"1.50 KiB"``."""
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  return str(n)


def plan(params: PyTree, rules: Sequence[Rule]) -> Plan:
  """Dry run of `quantize_params`: per leaf, the spec it would get and its bytes before/after."""
  if not isinstance(rules, (str, Rule)):
    rules = tuple(rules)
  if isinstance(rules, (str, Rule)) or not all(isinstance(r, Rule) for r in rules):
    raise TypeError(
      f"rules must be a list of jaxquant.Rule, got {str(rules)[:80]}; e.g. "
      "[jq.Rule('.*', weight='int8')] or jq.default_rules('int8')."
    )
  rows, used = [], set()
  for path, value in named_leaves(params):
    idx, spec, note = selection(path, value, rules)
    if idx is not None:
      used.add(idx)
    shape = tuple(np.shape(value)) if not isinstance(value, QArray) else value.shape
    batch = rules[idx].batch_dims if spec is not None and idx is not None else 0
    before = _nbytes(value)
    problem = None
    after = before
    if spec is not None:
      try:
        check_group_size(spec, shape[batch:], path)
        spec.resolved_axis(len(shape) - batch)
        after = spec.nbytes(shape[batch:]) * math.prod(shape[:batch])
      except ValueError as e:
        problem = str(e) if str(e).startswith(path) else f"{path}: {e}"
    rows.append(
      PlanRow(
        path, shape, np.dtype(value.dtype).name, idx, spec, before, after, note, problem, batch
      )
    )
  unused = tuple(r for i, r in enumerate(rules) if i not in used)
  return Plan(tuple(rows), rules, unused)


def progress_bar(items: Sequence, description: str, progress: bool | Callable) -> Iterable:
  """`items`, shown with a progress bar: ``progress`` is False (none), True (`rich` when it is
  installed) or a callable ``(items, description) -> iterable`` of the caller's choosing."""
  if not progress:
    return items
  if callable(progress):
    return progress(items, description)
  try:
    from rich.progress import track  # optional: the core does not depend on rich
  except ImportError:
    return items
  return track(items, description=description, transient=True)


# --------------------------------------------------------------------------- transforms
def _leaf_key(key: jax.Array | None, path: str) -> jax.Array | None:
  """A per-parameter key, stable under changes elsewhere in the tree."""
  return None if key is None else jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def check_quantizable(leaves: dict[str, Any], p: Plan) -> list[PlanRow]:
  """The rows of `p` still to quantize (leaves not yet QArrays), after checking each leaf is
  finite and within its spec's scale range: a `ValueError` naming the first bad path, before
  any work (`quantize_params` and the PTQ recipes both call it)."""
  todo = [r for r in p.quantized if not isinstance(leaves[r.path], QArray)]
  for r in todo:
    check_finite(leaves[r.path], r.path)
    spec = cast(QuantSpec, r.spec)  # Plan.quantized: rows with a spec
    check_scale_range(leaves[r.path], spec, r.path, r.batch_dims)
  return todo


def quantize_params(
  params: PyTree,
  rules: Sequence[Rule] | Plan,
  *,
  key: jax.Array | None = None,
  progress: bool | Callable = False,
) -> PyTree:
  """The same tree with a `QArray` for every leaf a rule quantizes.

  Every matched tensor is checked first (group sizes, NaN/Inf, a range too wide for a 16-bit
  scale: `numerics.check_scale_range`), so a bad parameter raises a ValueError naming its path
  before anything is quantized. Zero-size leaves are kept as they are (the plan notes them).
  Rules that matched nothing warn.

  Args:
    params: Linen params dict, nested dicts/lists of arrays, or NNX `State`.
    rules: ordered rules (the first match per path wins), or the `Plan` of these params
      already made from them.
    key: PRNG key for specs with stochastic rounding (folded with a hash of each path).
    progress: show a progress bar (see `progress_bar`).
  """
  p = rules if isinstance(rules, Plan) else plan(params, rules)
  p.check()
  leaves = dict(named_leaves(params))
  todo = check_quantizable(leaves, p)
  p.warn_unused()
  done: dict[str, QArray] = {}
  for r in progress_bar(todo, "quantizing", progress):
    done[r.path] = quantize(
      leaves[r.path], r.spec, key=_leaf_key(key, r.path), path=r.path, batch_dims=r.batch_dims
    )
  return map_leaves(lambda path, v: done.get(path, v), params)


def dequantize_params(qparams: PyTree, dtype=None) -> PyTree:
  """Replaces every `QArray` leaf by its dequantized array (original dtype unless `dtype`)."""
  return map_leaves(lambda _, v: dequantize(v, dtype) if isinstance(v, QArray) else v, qparams)


def fake_quant_params(
  params: PyTree, rules: Sequence[Rule], *, key: jax.Array | None = None
) -> PyTree:
  """Differentiable ``dequantize(quantize(w))`` of every leaf a rule quantizes (for QAT).

  Gradients pass straight through inside each tensor's range and are zero where it clips.
  Jit-able: selection depends only on paths, shapes and dtypes (zero-size leaves are kept).
  """
  rules = tuple(rules)

  def one(path, value):
    idx, spec, _ = selection(path, value, rules)
    if spec is None or idx is None:
      return value
    batch = rules[idx].batch_dims
    check_group_size(spec, np.shape(value)[batch:], path)
    return fake_quant(value, spec, key=_leaf_key(key, path), batch_dims=batch)

  return map_leaves(one, params)


# --------------------------------------------------------------------------- shardings
def _box_spec(leaf, axis_rules) -> PartitionSpec | None:
  """The partition spec a box asks for (logical names through `axis_rules`), or None."""
  if isinstance(leaf, nn.LogicallyPartitioned):
    names = leaf.names
    rules = axis_rules if axis_rules is not None else leaf.rules
    return nn.logical_to_mesh_axes(names, rules)
  if isinstance(leaf, nn.Partitioned):
    names = leaf.names
  elif isinstance(leaf, nnx.Variable):
    meta = leaf.get_metadata()
    found = [meta[k] for k in ("out_sharding", "sharding_names", "sharding") if meta.get(k)]
    if not found:
      return None
    names = tuple(found[0])
  else:
    return None
  if axis_rules is not None:
    return nn.logical_to_mesh_axes(names, axis_rules)
  return PartitionSpec(*names)


def _box_mesh(leaf) -> Mesh | None:
  mesh = getattr(leaf, "mesh", None)
  if mesh is None and isinstance(leaf, nnx.Variable):
    mesh = leaf.get_metadata().get("mesh")
  return mesh if isinstance(mesh, Mesh) else None


def leaf_sharding(leaf, mesh: Mesh | None = None, axis_rules=None) -> Sharding | None:
  """The sharding of one leaf's logical tensor: its box's partition spec over `mesh` (or the
  box's own mesh), else the sharding its array already has, else replicated over `mesh`;
  None when there is neither a mesh nor a sharded array."""
  spec = _box_spec(leaf, axis_rules)
  mesh = mesh or _box_mesh(leaf)
  if spec is not None and mesh is not None:
    return NamedSharding(mesh, spec)
  value = _unwrap(leaf)
  own = getattr(value.values if isinstance(value, QArray) else value, "sharding", None)
  if isinstance(value, QArray) and isinstance(own, NamedSharding):  # stored order -> logical
    stored = tuple(own.spec) + (None,) * (value.ndim - len(own.spec))
    logical = [stored[int(i)] for i in np.argsort(value.axis_order)]
    return NamedSharding(own.mesh, PartitionSpec(*logical))
  if isinstance(own, NamedSharding) or (own is not None and mesh is None):
    return own
  return NamedSharding(mesh, PartitionSpec()) if mesh is not None else None


def _children_sharding(value, sharding: Sharding | None):
  """`sharding` of a logical tensor, spread over a QArray's children (`qarray_sharding`)."""
  if not isinstance(value, QArray):
    return sharding
  if isinstance(sharding, NamedSharding):
    return qarray_sharding(value, sharding)
  return jax.tree.map(lambda _: sharding, value)


def param_shardings(params: PyTree, mesh: Mesh | None = None, axis_rules=None) -> PyTree:
  """A tree of shardings shaped like `params`, for ``jax.device_put(params, s)`` or `jit`'s
  ``in_shardings``/``out_shardings``.

  Each leaf's logical sharding is its box's partition spec (Linen ``nn.with_partitioning``,
  ``nn.LogicallyPartitioned`` through `axis_rules`, e.g. ``nn.logical_axis_rules`` pairs; NNX
  ``sharding`` metadata) over `mesh`, or the sharding its array has (see `leaf_sharding`). A
  QArray's children follow it: codes like the kernel, scales and zero points along the axes
  they cover (`jaxquant.qarray.qarray_sharding`). Boxes and Variables are kept around the
  shardings, so the tree matches `params` node for node.
  """
  flat, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_leaf)
  out = []
  for leaf in flat:
    sharding = leaf_sharding(leaf, mesh, axis_rules)
    out.append(_rewrap(leaf, _children_sharding(_unwrap(leaf), sharding)))
  return jax.tree_util.tree_unflatten(treedef, out)


def quantized_shardings(
  params: PyTree, rules: Sequence[Rule] | Plan, mesh: Mesh | None = None, axis_rules=None
) -> PyTree:
  """The shardings of ``quantize_params(params, rules)``, from those of `params`: a kept leaf
  keeps its own; a quantized one's codes are sharded like the kernel was, its scales and zero
  points along the axes they cover. Computed from shapes alone (`jax.eval_shape`)."""
  p = rules if isinstance(rules, Plan) else plan(params, rules)
  logical = {
    path_str(kp): leaf_sharding(leaf, mesh, axis_rules)
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_leaf)[0]
  }
  shapes = jax.eval_shape(functools.partial(_quantize_traced, p=p), params)
  return map_leaves(lambda path, v: _children_sharding(v, logical[path]), shapes)


def _quantize_traced(params: PyTree, p: Plan, key: jax.Array | None = None) -> PyTree:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the caller has warned once already
    return quantize_params(params, p, key=key)


def quantize_sharded(
  params: PyTree,
  rules: Sequence[Rule] | Plan,
  *,
  key: jax.Array | None = None,
  mesh: Mesh | None = None,
  axis_rules=None,
) -> PyTree:
  """`quantize_params` of a tree of (sharded) `jax.Array`s as one `jit` whose outputs are
  placed by `quantized_shardings`: every device quantizes the shards it holds (a scale that
  spans a split axis is reduced across the devices holding it), and codes, scales and zero
  points come out sharded like their kernels, with no resharding of the inputs.

  The checks of `quantize_params` (finite values, 16-bit scale ranges) run first on the
  devices; only one flag and ``max |x|`` per leaf reach the host, never the weights.
  """
  p = rules if isinstance(rules, Plan) else plan(params, rules)
  p.check()
  check_quantizable(dict(named_leaves(params)), p)
  p.warn_unused()
  out = quantized_shardings(params, p, mesh, axis_rules)
  return jax.jit(functools.partial(_quantize_traced, p=p), out_shardings=out)(params, key=key)
