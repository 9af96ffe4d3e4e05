"""Serve functions as portable artifacts: `jax.export` for CPU, CUDA and TPU from any machine.

    export_serve(out, fn, variables, inputs)     # fn(variables, *inputs) -> outputs
    served = load_exported(out)                  # reads the artifact and its params
    y = served(*args)                            # = jax.jit(fn)(variables, *args)

An artifact is a folder of three files, written together (atomically):

* ``serve.jaxexport``: the serialized `jax.export.Exported`, StableHLO lowered once per
  platform (cpu, cuda, tpu by default). The params are its **first argument**, not constants
  baked into the program, so the file holds only the computation (the int8 dots, the int4
  unpacking, the rescales) and stays small whatever the model size.
* ``model.safetensors``: those params, quantized (`jaxquant.save`: int8 codes, packed int4,
  scales), with the tree structure the exported function expects.
* ``export.json``: the manifest: platforms, input shapes (symbolic dimensions by name) and
  dtypes, the calling convention, versions, and free-form metadata (model, recipe...).

Input dimensions given as names (``symbolic_inputs("b, t", ...)``) stay symbolic: one artifact
serves every batch size and sequence length.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import jax
import numpy as np
from jax import export as jax_export

from jaxquant import io
from jaxquant._version import __version__
from jaxquant.ops import cpu_kernels
from jaxquant.ops.lowerings import lowering_scope

PLATFORMS = ("cpu", "cuda", "tpu")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for
PROGRAM = "serve.jaxexport"
PARAMS = io.DEFAULT_FILENAME
MANIFEST = "export.json"
CALLING_CONVENTION = (
  "fn(variables, *inputs) -> outputs; variables = jaxquant.load(model.safetensors)"
)


def symbolic_inputs(
  dims: str, dtypes: Sequence[Any], constraints: Sequence[str] = ()
) -> list[jax.ShapeDtypeStruct]:
  """Inputs that share the symbolic shape `dims` (e.g. ``"b, t"``), one per dtype;
  `constraints` such as ``"t <= 512"`` bound the dimensions (see `jax.export`)."""
  shape = jax_export.symbolic_shape(dims, constraints=tuple(constraints))
  return [jax.ShapeDtypeStruct(shape, np.dtype(d)) for d in dtypes]


def check_platforms(platforms: Sequence[str], what: str = "platforms") -> tuple[str, ...]:
  """`platforms` as a tuple, or ValueError (naming `what`) if one is not a platform that
  `jax.export` lowers for (it would write an artifact that runs nowhere), or none is given."""
  platforms = tuple(platforms)
  unknown = [p for p in platforms if p not in KNOWN_PLATFORMS]
  if unknown or not platforms or len(set(platforms)) < len(platforms):
    raise ValueError(
      f"{what} {','.join(platforms) or '(none)'}: give distinct ones of "
      f"{', '.join(KNOWN_PLATFORMS)}, such as {','.join(PLATFORMS)}."
    )
  return platforms


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def lower(
  fn: Callable, variables, inputs: Sequence[Any], platforms: Sequence[str] = PLATFORMS
) -> jax_export.Exported:
  """`jax.export` of ``fn(variables, *inputs)`` for `platforms`, params as an argument.

  `inputs` are arrays or `jax.ShapeDtypeStruct`s (symbolic dims allowed); `fn` may already be
  jitted. Runs on any machine: lowering for CUDA or TPU needs no such device.

  Traced without the compiled CPU kernels (`lowering_scope(kernels=False)`), so the artifact
  is pure XLA and runs wherever jax does. A trace of `fn` that jax cached earlier with the
  kernels may still be reused; its CPU lowering then calls them, and `load_exported`
  registers them (the safety check is lifted for those two targets, no other).
  """
  # `fn` with a `lower` method is already jitted (a `jax.stages.Wrapped`)
  platforms = check_platforms(platforms)
  jitted = cast(jax.stages.Wrapped, fn) if hasattr(fn, "lower") else jax.jit(fn)
  shapes = [x if isinstance(x, jax.ShapeDtypeStruct) else _abstract(x) for x in inputs]
  checks = [
    jax_export.DisabledSafetyCheck.custom_call(t)
    for t in (cpu_kernels.WQ_TARGET, cpu_kernels.INT8_TARGET)
  ]
  with lowering_scope(kernels=False):
    exported = jax_export.export(jitted, platforms=platforms, disabled_checks=checks)
    return exported(_abstract(variables), *shapes)


def _describe(x: jax.core.ShapedArray) -> dict:
  return {
    "shape": [d if isinstance(d, int) else str(d) for d in x.shape],
    "dtype": np.dtype(x.dtype).name,
  }


def save_exported(
  out: str | os.PathLike,
  exported: jax_export.Exported,
  variables,
  metadata: dict | None = None,
  check: Callable[[Path], object] | None = None,
) -> Path:
  """Writes the artifact folder `out` (see module doc); files appear only once all are written.

  The files are written to a temporary folder beside `out`, then moved in, the manifest last;
  other files already in `out` are left alone. ``check(folder)`` (e.g. `load_exported` and a
  test call) runs on the complete temporary folder first: if it raises, `out` is untouched.
  """
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  manifest = {
    "format": "jaxquant-export",
    "format_version": 1,
    "jaxquant": __version__,
    "jax": jax.__version__,
    "platforms": list(exported.platforms),
    "calling_convention": CALLING_CONVENTION,
    "program": PROGRAM,
    "params": PARAMS,
    "inputs": [_describe(x) for x in exported.in_avals[len(jax.tree.leaves(variables)) :]],
    "outputs": [_describe(x) for x in exported.out_avals],
    "params_embedded": False,
    "metadata": metadata or {},
  }
  tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
  try:
    (tmp / PROGRAM).write_bytes(exported.serialize())
    io.save(tmp / PARAMS, variables)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if check is not None:
      check(tmp)
    out.mkdir(exist_ok=True)
    for name in (PROGRAM, PARAMS, MANIFEST):
      os.replace(tmp / name, out / name)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def export_serve(
  out: str | os.PathLike,
  fn: Callable,
  variables,
  inputs: Sequence[Any],
  platforms: Sequence[str] = PLATFORMS,
  metadata: dict | None = None,
  check: Callable[[Path], object] | None = None,
) -> Path:
  """`lower` then `save_exported`: the artifact folder for ``fn(variables, *inputs)``."""
  exported = lower(fn, variables, inputs, platforms)
  return save_exported(out, exported, variables, metadata, check)


@dataclasses.dataclass
class Served:
  """A loaded artifact: ``served(*inputs)`` runs the exported program on its params."""

  exported: jax_export.Exported
  variables: Any
  manifest: dict

  def __post_init__(self):
    self._call = jax.jit(self.exported.call)

  @property
  def platforms(self) -> tuple[str, ...]:
    return tuple(self.exported.platforms)

  def __call__(self, *inputs):
    return self._call(self.variables, *inputs)


def load_exported(path: str | os.PathLike) -> Served:
  """Reads an artifact folder written by `export_serve` (params loaded with `jaxquant.load`)."""
  path = Path(path)
  missing = [n for n in (PROGRAM, PARAMS, MANIFEST) if not (path / n).is_file()]
  if missing:
    raise FileNotFoundError(
      f"{path}: not a jaxquant export (missing {', '.join(missing)}); write one with "
      "`jaxquant export` or jaxquant.export.export_serve."
    )
  manifest = json.loads((path / MANIFEST).read_text())
  cpu_kernels.available()  # registers the CPU kernels an artifact's CPU lowering may call
  exported = jax_export.deserialize(bytearray((path / PROGRAM).read_bytes()))
  variables = io.load(path / PARAMS)
  # in_tree is ((variables, *inputs), kwargs). jaxlib ships no type stubs for PyTreeDef.
  params_tree = exported.in_tree.children()[0].children()[0]  # type: ignore[attr-defined]
  if jax.tree.structure(variables) != params_tree:
    raise ValueError(
      f"{path}: {PARAMS} does not match the parameter tree the exported program expects; "
      "re-export the model."
    )
  return Served(exported, variables, manifest)
