"""Build of the compiled CPU kernels (`jaxquant.ops.cpu_kernels`); everything else is in
pyproject.toml.

The kernels are C++ against the XLA FFI headers that jaxlib ships, built into a plain shared
library (loaded with ctypes, registered with `jax.ffi`). The build is optional: without a C++
compiler the package installs and serves through its pure-XLA lowerings.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildKernels(build_ext):
  """`build_ext` for a library that is not a Python module (no ``PyInit_`` symbol)."""

  def get_export_symbols(self, ext):
    return []

  def build_extension(self, ext):
    try:
      import jaxlib  # in the build environment: pyproject's build-system requires it
    except ImportError:
      self.warn("jaxlib is not importable at build time: the CPU kernels are not built")
      return
    ext.include_dirs.append(os.path.join(os.path.dirname(jaxlib.__file__), "include"))
    super().build_extension(ext)


setup(
  ext_modules=[
    Extension(
      "jaxquant.ops._cpu_kernels",
      sources=["jaxquant/ops/kernels/cpu_matmul.cc"],
      language="c++",
      extra_compile_args=["-O3", "-std=c++17", "-Wno-attributes", "-Wno-return-type"],
      optional=True,
    )
  ],
  cmdclass={"build_ext": BuildKernels},
)
