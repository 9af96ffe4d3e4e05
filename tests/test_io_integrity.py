"""Checkpoint integrity: corruption is a clear error, never a silently different tree; saves
leave no debris; names cannot collide with the stored parts; memory stays near the file size."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxquant as jq
from jaxquant import io
from jaxquant.transforms import named_leaves


def _tree():
  x = jax.random.normal(jax.random.key(0), (32, 48))
  return {
    "layers": [
      {"kernel": jq.quantize(x, "int8"), "bias": jnp.arange(48, dtype=jnp.float32)},
      {"kernel": jq.quantize(x * 3, "int4:g16:asym:scale=f16"), "bias": jnp.ones(48, jnp.bfloat16)},
    ],
    "embed": jq.quantize(x, "nf4:g16"),
    "step": jnp.array(7, jnp.int32),
  }


def _same(a, b) -> bool:
  la, lb = named_leaves(a), named_leaves(b)
  if [p for p, _ in la] != [p for p, _ in lb]:
    return False
  for (_, x), (_, y) in zip(la, lb):
    if isinstance(x, jq.QArray) != isinstance(y, jq.QArray):
      return False
    if isinstance(x, jq.QArray) and (x.spec, x.shape, x.dtype) != (y.spec, y.shape, y.dtype):
      return False
    for cx, cy in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
      if cx.dtype != cy.dtype or cx.shape != cy.shape:
        return False
      if np.asarray(cx).tobytes() != np.asarray(cy).tobytes():
        return False
  return True


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = jq.save(tmp_path_factory.mktemp("ckpt") / "m.safetensors", _tree())
  return path.read_bytes(), jq.load(path)


def _split(data: bytes) -> tuple[dict, bytes]:
  n = int.from_bytes(data[:8], "little")
  return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(index: dict, body: bytes) -> bytes:
  head = json.dumps(index, separators=(",", ":")).encode()
  head += b" " * (-len(head) % 8)
  return len(head).to_bytes(8, "little") + head + body


def _resealed(index: dict, mutate) -> dict:
  """`index` with its jaxquant header changed by `mutate(header)` and its checksum redone, as a
  buggy writer (not a random corruption) would leave it."""
  header = json.loads(index["__metadata__"]["jaxquant"])
  mutate(header)
  text = json.dumps(header)
  index["__metadata__"] = {"jaxquant": text, "jaxquant_crc32": str(io.crc32(text.encode()))}
  return index


def _load_or_error(path):
  try:
    return jq.load(path)
  except ValueError as e:
    assert str(path) in str(e)
    return e


@settings(
  max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_flips_and_truncations_never_load_a_different_tree(tmp_path, saved, data):
  raw, tree = saved
  buf = bytearray(raw)
  n_head = 8 + int.from_bytes(raw[:8], "little")
  where = data.draw(st.sampled_from(["header", "anywhere", "truncate"]))
  if where == "truncate":
    buf = buf[: data.draw(st.integers(0, len(buf) - 1))]
  else:
    hi = n_head if where == "header" else len(buf)
    for _ in range(data.draw(st.integers(1, 3))):
      i = data.draw(st.integers(0, hi - 1))
      buf[i] ^= 1 << data.draw(st.integers(0, 7))
  path = tmp_path / "c.safetensors"
  path.write_bytes(bytes(buf))
  got = _load_or_error(path)
  if not isinstance(got, ValueError):
    assert bytes(buf) == raw or _same(got, tree), "a corrupted file loaded as a different tree"


def test_every_single_bit_flip_in_the_header_is_caught(tmp_path, saved):
  raw, tree = saved
  n_head = 8 + int.from_bytes(raw[:8], "little")
  rng = np.random.default_rng(0)
  path = tmp_path / "h.safetensors"
  for i in rng.choice(n_head, 300, replace=False):
    buf = bytearray(raw)
    buf[i] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(buf))
    got = _load_or_error(path)
    assert isinstance(got, ValueError) or _same(got, tree), f"byte {i}"


def test_a_flipped_code_byte_fails_its_checksum_unless_verification_is_off(tmp_path, saved):
  raw, _ = saved
  index, body = _split(raw)
  begin = index["layers/0/kernel#values"]["data_offsets"][0]
  body = bytearray(body)
  body[begin + 5] ^= 0x10
  path = tmp_path / "f.safetensors"
  path.write_bytes(_join(index, bytes(body)))
  with pytest.raises(ValueError, match=r"layers/0/kernel#values does not match its checksum"):
    jq.load(path)
  trusted = jq.load(path, verify=False)  # the documented opt-out: no checksums, the flip loads
  assert not _same(trusted, saved[1])


def test_relabelled_dtype_and_permuted_shape_are_caught(tmp_path, saved):
  raw, _ = saved
  path = tmp_path / "r.safetensors"
  index, body = _split(raw)
  index["layers/0/kernel#values"]["dtype"] = "U8"
  path.write_bytes(_join(index, body))
  with pytest.raises(ValueError, match=r"layers/0/kernel#values is stored as U8"):
    jq.load(path)
  index, body = _split(raw)
  index["layers/0/kernel#values"]["shape"] = [48, 32]
  path.write_bytes(_join(index, body))
  with pytest.raises(ValueError, match=r"stored as I8\[48, 32\]"):
    jq.load(path)

  def permute(header):
    header["tensors"]["layers/0/kernel#values"]["shape"] = [48, 32]

  index, body = _split(raw)
  index["layers/0/kernel#values"]["shape"] = [48, 32]
  path.write_bytes(_join(_resealed(index, permute), body))
  with pytest.raises(ValueError, match=r"leaf layers/0/kernel: .*shape.*corrupt"):
    jq.load(path)


def test_non_finite_scales_are_refused_on_save_and_on_load(tmp_path, saved):
  q = jq.quantize(jnp.ones((4, 8)), "int8")
  bad = jq.QArray(q.values, q.scale.at[0].set(jnp.nan), None, q.spec, q.dtype)
  with pytest.raises(ValueError, match=r"^w: its scale holds inf or NaN"):
    jq.save(tmp_path / "n.safetensors", {"w": bad})
  assert not list(tmp_path.iterdir())
  raw, _ = saved
  index, body = _split(raw)
  begin, end = index["layers/0/kernel#scale"]["data_offsets"]
  scale = np.frombuffer(body[begin:end], np.float32).copy()
  scale[3] = np.inf
  body = body[:begin] + scale.tobytes() + body[end:]

  def recrc(header):
    header["tensors"]["layers/0/kernel#scale"]["crc32"] = io.crc32(scale)

  path = tmp_path / "s.safetensors"
  path.write_bytes(_join(_resealed(index, recrc), body))
  with pytest.raises(ValueError, match=r"leaf layers/0/kernel: its stored scale holds inf or NaN"):
    jq.load(path)


def test_unknown_dtypes_and_malformed_entries_are_one_clear_error(tmp_path, saved):
  raw, _ = saved
  path = tmp_path / "u.safetensors"
  index, body = _split(raw)
  index["step"]["dtype"] = "F8_E8M0"
  path.write_bytes(_join(index, body))
  with pytest.raises(ValueError, match=r"tensor step has dtype 'F8_E8M0'.*Convert"):
    jq.load(path)
  mutations = [
    lambda h: h["leaves"][0].pop("keys"),
    lambda h: h["leaves"][0].update(dtype="float77"),
    lambda h: h["leaves"][0].update(spec="int9"),
    lambda h: h["leaves"][0].update(kind="table"),
    lambda h: h["leaves"][0].update(children=["values", "bias"]),
    lambda h: h["leaves"][0].update(keys=[["dict", "other"]]),
    lambda h: h["leaves"][0].update(shape="big"),
    lambda h: h.update(leaves={"a": 1}),
    lambda h: h.update(tensors=[]),
  ]
  for mutate in mutations:
    index, body = _split(raw)
    path.write_bytes(_join(_resealed(index, mutate), body))
    with pytest.raises(ValueError, match="corrupt"):
      jq.load(path)


def test_format_versions_newer_older_and_unknown(tmp_path, saved):
  raw, tree = saved
  path = tmp_path / "v.safetensors"
  index, body = _split(raw)
  path.write_bytes(_join(_resealed(index, lambda h: h.update(format_version=99)), body))
  with pytest.raises(ValueError, match=r"format 99.*Upgrade jaxquant"):
    jq.load(path)
  index, body = _split(raw)
  path.write_bytes(_join(_resealed(index, lambda h: h.update(format_version=0)), body))
  with pytest.raises(ValueError, match="format 0, which no released jaxquant wrote"):
    jq.load(path)
  # Format 1 (no checksums) still loads, to the same tree.
  index, body = _split(raw)
  header = json.loads(index["__metadata__"]["jaxquant"])
  header["format_version"] = 1
  del header["tensors"]
  index["__metadata__"] = {"jaxquant": json.dumps(header)}
  path.write_bytes(_join(index, body))
  assert _same(jq.load(path), tree)
  # Format 2 must carry its header checksum.
  index, body = _split(raw)
  del index["__metadata__"]["jaxquant_crc32"]
  path.write_bytes(_join(index, body))
  with pytest.raises(ValueError, match="lacks its checksum"):
    jq.load(path)


def test_leaf_names_that_collide_with_stored_parts_are_refused_before_writing(tmp_path):
  q = jq.quantize(jnp.ones((4, 8)), "int8")
  for tree in ({"w": q, "w#values": jnp.zeros(3)}, {"w#scale": jnp.zeros(3), "w": q}):
    with pytest.raises(ValueError, match=r"stored as tensor 'w#(values|scale)'.*rename one"):
      jq.save(tmp_path / "x.safetensors", tree)
  with pytest.raises(ValueError, match="reserved"):
    jq.save(tmp_path / "x.safetensors", {"__metadata__": jnp.zeros(3)})
  assert not list(tmp_path.iterdir())


def _script(body: str) -> list[str]:
  return [sys.executable, "-c", textwrap.dedent(body)]


def test_a_killed_save_leaves_one_named_temporary_that_the_next_save_removes(tmp_path):
  target = tmp_path / "m.safetensors"
  kill = f"""
    import os, signal, numpy as np, safetensors
    from jaxquant import io
    def crash(specs, filename, metadata=None):
      open(filename, "wb").write(b"partial" * 1000)
      os.kill(os.getpid(), signal.SIGKILL)
    safetensors.serialize_file = crash
    io.save({str(target)!r}, {{"w": np.ones((64, 64), np.float32)}})
  """
  proc = subprocess.run(_script(kill), capture_output=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL
  debris = list(tmp_path.iterdir())
  assert len(debris) == 1 and debris[0].name.startswith(".m.safetensors.")
  live = tmp_path / f".m.safetensors.{os.getppid()}.abcdefgh.tmp"  # a running writer's file
  live.write_bytes(b"in progress")
  jq.save(target, {"w": jnp.ones(3)})
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "m.safetensors"])


def test_concurrent_saves_of_one_target_leave_one_complete_file(tmp_path):
  target = tmp_path / "m.safetensors"
  writer = f"""
    import sys, numpy as np
    from jaxquant import io
    v = float(sys.argv[1])
    for _ in range(20):
      io.save({str(target)!r}, {{"w": np.full((256, 256), v, np.float32)}})
  """
  procs = [subprocess.Popen([*_script(writer), str(v)]) for v in (1.0, 2.0)]
  assert [p.wait(timeout=180) for p in procs] == [0, 0]
  w = np.asarray(jq.load(target)["w"])
  assert w.shape == (256, 256) and len(np.unique(w)) == 1 and w[0, 0] in (1.0, 2.0)
  assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_folder_targets_and_symlinks(tmp_path):
  tree = {"w": jq.quantize(jnp.ones((4, 8)), "int8")}
  path = jq.save(f"{tmp_path}/new/", tree)  # a trailing separator means a folder, created
  assert path == tmp_path / "new" / io.DEFAULT_FILENAME and _same(jq.load(tmp_path / "new"), tree)
  real = tmp_path / "real.safetensors"
  jq.save(real, {"w": jnp.zeros(2)})
  link = tmp_path / "link.safetensors"
  link.symlink_to(real)
  assert jq.save(link, tree) == real  # the link is followed; the file it names is replaced
  assert link.is_symlink() and _same(jq.load(real), tree)
  with pytest.raises(IsADirectoryError):
    io.atomic_write(tmp_path / "new", lambda tmp: None)


def test_load_peak_memory_stays_near_the_file_size(tmp_path):
  path = tmp_path / "big.safetensors"
  x = np.random.default_rng(0).standard_normal((2048, 2048), np.float32)
  tree = {f"l{i}": {"kernel": jq.quantize(x, "int8"), "bias": x[0]} for i in range(6)}
  tree["embed"] = x
  jq.save(path, tree)
  size = os.path.getsize(path)
  probe = f"""
    import resource, jax.numpy as jnp, jaxquant as jq
    jnp.ones(3).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tree = jq.load({str(path)!r})
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
  """
  out = subprocess.run(_script(probe), capture_output=True, text=True, timeout=300, check=True)
  grown = int(out.stdout.split()[-1])
  assert grown <= 1.3 * size, f"load grew RSS by {grown / size:.2f}x the file"


def test_64_bit_and_0_d_leaves_come_back_exactly(tmp_path):
  tree = {
    "i": np.array([2**40, -1]),
    "u": np.array([2**63], np.uint64),
    "f": np.array([0.1, 1e300]),
    "scalar": jnp.float32(3),
    "q": jq.quantize(jnp.float32(2.5), "int8"),
  }
  got = jq.load(jq.save(tmp_path / "x.safetensors", tree))
  for k in ("i", "u", "f"):
    assert got[k].dtype == tree[k].dtype and np.array_equal(got[k], tree[k]), k
  assert got["scalar"].shape == () and got["q"].shape == ()
  assert float(jq.dequantize(got["q"])) == float(jq.dequantize(tree["q"]))


def test_keys_that_would_not_load_back_are_refused_before_writing(tmp_path):
  for tree in ({1.5: jnp.ones(2)}, {True: jnp.ones(2)}, {"a": {None: jnp.ones(2)}}):
    with pytest.raises(TypeError, match="keys must be str or int"):
      jq.save(tmp_path / "k.safetensors", tree)
  assert not list(tmp_path.iterdir())


def test_resealed_headers_with_missing_checksums_stray_tensors_or_odd_dtypes(tmp_path, saved):
  raw, _ = saved
  path = tmp_path / "e.safetensors"
  cases = [
    (lambda h: h["tensors"]["step"].pop("crc32"), "no CRC-32"),
    (lambda h: h["tensors"]["step"].update(crc32=None), "no CRC-32"),
    (lambda h: h["leaves"].pop(), "belongs to no leaf"),
    (lambda h: h["leaves"][0].update(dtype="int32"), "not a floating dtype"),
    (lambda h: h["leaves"][0].update(dtype="object"), "not a floating dtype"),
  ]
  for mutate, message in cases:
    index, body = _split(raw)
    path.write_bytes(_join(_resealed(index, mutate), body))
    with pytest.raises(ValueError, match=message):
      jq.load(path)
