"""Real English sentences for calibration and evaluation, from the standard library's docstrings.

The Python standard library ships its own source on every machine, so its module, class and
function docstrings give plain technical English without a download. Two disjoint pools are
drawn from two disjoint, fixed lists of stdlib modules and packages:

* calibration: `CALIBRATION_MODULES` (email, http, logging, argparse, unittest, ...);
* evaluation: `EVALUATION_MODULES` (json, collections, asyncio, pathlib, typing, ...).

Each docstring is split into prose paragraphs (code, doctests, indented lists and headings
dropped) and then into sentences; those of 6 to 60 words are kept, deduplicated in source
order and put in a fixed pseudo-random order, so ``calibration_sentences(n)`` is always the
first ``n`` of one list (a smaller request is a prefix of a larger one). Any sentence that
occurs in both pools is removed from the evaluation pool. The pools depend on the Python
version's stdlib text, not on the machine.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sysconfig
import zlib
from pathlib import Path

import numpy as np

CALIBRATION_MODULES = (
  "email",
  "http",
  "logging",
  "argparse",
  "unittest",
  "urllib",
  "xml",
  "mailbox",
  "configparser",
  "smtplib",
)
EVALUATION_MODULES = (
  "json",
  "collections",
  "asyncio",
  "pathlib",
  "typing",
  "importlib",
  "threading",
  "inspect",
  "statistics",
  "ipaddress",
  "enum",
  "functools",
)
MIN_WORDS, MAX_WORDS = 6, 60
SEED = 0

_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_HEADING = re.compile(r"^\s*[-=~^*]{3,}\s*$")
_DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_dir() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def module_files(name: str) -> list[Path]:
  """The ``.py`` files of stdlib module or package `name`, sorted, test folders excluded."""
  root = stdlib_dir()
  folder = root / name
  if folder.is_dir():
    files = sorted(folder.rglob("*.py"))
    return [f for f in files if not _SKIP_DIRS & set(f.relative_to(root).parts)]
  single = root / f"{name}.py"
  return [single] if single.is_file() else []


def docstrings(path: str | os.PathLike) -> list[str]:
  """Module, class and function docstrings of one source file, in source order."""
  try:
    tree = ast.parse(Path(path).read_text(encoding="utf-8", errors="replace"))
  except SyntaxError:
    return []
  nodes = [n for n in ast.walk(tree) if isinstance(n, _DOCSTRING_NODES)]
  nodes.sort(key=lambda n: getattr(n, "lineno", 0))
  return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def _is_prose(lines: list[str]) -> bool:
  """False for doctests, indented blocks, headings, option lists and field lists."""
  first = lines[0]
  return not (
    any(line[:1].isspace() or line.lstrip().startswith((">>>", "...")) for line in lines)
    or any(_HEADING.match(line) for line in lines)
    or first.startswith(("-", "*", ":", "@", "#"))
    or first.rstrip().endswith(":")
  )


def _is_sentence(text: str) -> bool:
  words = text.split()
  if not MIN_WORDS <= len(words) <= MAX_WORDS or not text[0].isupper() or text[-1] not in ".!?":
    return False
  letters = sum(c.isalpha() or c.isspace() for c in text)
  return letters >= 0.85 * len(text) and "::" not in text


def prose_paragraphs(doc: str) -> list[str]:
  """The prose paragraphs of one (cleaned) docstring, each on one line."""
  out = []
  for paragraph in re.split(r"\n\s*\n", doc):
    lines = [line for line in paragraph.split("\n") if line.strip()]
    if lines and _is_prose(lines):
      out.append(" ".join(line.strip() for line in lines))
  return out


def sentences_of(doc: str) -> list[str]:
  """The prose sentences of one (cleaned) docstring with ``MIN_WORDS..MAX_WORDS`` words."""
  return [s for text in prose_paragraphs(doc) for s in _SENTENCE_END.split(text) if _is_sentence(s)]


def collect(modules: tuple[str, ...]) -> list[str]:
  """Deduplicated sentences of `modules`' docstrings, in module, file and source order."""
  seen: dict[str, None] = {}
  for name in modules:
    for path in module_files(name):
      for doc in docstrings(path):
        seen.update((s, None) for s in sentences_of(doc))
  return list(seen)


def _shuffled(sentences: list[str]) -> tuple[str, ...]:
  order = np.random.default_rng(SEED).permutation(len(sentences))
  return tuple(sentences[i] for i in order)


@functools.lru_cache(maxsize=1)
def _pools() -> tuple[tuple[str, ...], tuple[str, ...]]:
  calibration, evaluation = _disjoint(collect)
  return _shuffled(calibration), _shuffled(evaluation)


def _take(pool: tuple[str, ...], n: int, which: str) -> list[str]:
  if not 0 <= n <= len(pool):
    raise ValueError(f"asked for {n} {which} sentences; the stdlib here yields {len(pool)}.")
  return list(pool[:n])


def calibration_sentences(n: int = 512) -> list[str]:
  """The first `n` calibration sentences (from `CALIBRATION_MODULES`)."""
  return _take(_pools()[0], n, "calibration")


def evaluation_sentences(n: int = 256) -> list[str]:
  """The first `n` evaluation sentences (from `EVALUATION_MODULES`); none is a calibration one."""
  return _take(_pools()[1], n, "evaluation")


def write_sentences(path: str | os.PathLike, sentences: list[str]) -> Path:
  """Writes one sentence a line (UTF-8) and returns the path."""
  if any("\n" in s for s in sentences):
    raise ValueError("sentences must not contain newlines.")
  path = Path(path)
  path.write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
  return path


def read_sentences(path: str | os.PathLike, what: str = "--sentences") -> list[str]:
  """The sentences `write_sentences` wrote, one a line."""
  return read_utf8(path, what).splitlines()


# --------------------------------------------------------------------------- source bytes
HELDOUT_EVERY = 10  # one file in ten (by a hash of its path) is held out


def _is_heldout(relative: str) -> bool:
  return zlib.crc32(relative.encode()) % HELDOUT_EVERY == 0


@functools.lru_cache(maxsize=4)
def stdlib_source(split: str = "train", max_bytes: int = 8 << 20) -> np.ndarray:
  """The standard library's own ``.py`` source as bytes (``uint8 [N]``), for byte-level LMs.

  Files (test folders and ``site-packages`` excluded) are split by a fixed hash of their
  relative path: ``heldout`` is about one file in ten, ``train`` the rest; each split is the
  concatenation of its files in sorted order, cut at `max_bytes`.
  """
  if split not in ("train", "heldout"):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}.")
  root = stdlib_dir()
  chunks, total = [], 0
  for f in sorted(root.rglob("*.py")):
    rel = f.relative_to(root)
    if _SKIP_DIRS & set(rel.parts) or "site-packages" in rel.parts:
      continue
    if _is_heldout(str(rel)) != (split == "heldout"):
      continue
    try:
      data = f.read_bytes()
    except OSError:
      continue
    chunks.append(data + b"\n\n")
    total += len(data) + 2
    if total >= max_bytes:
      break
  return np.frombuffer(b"".join(chunks)[:max_bytes], np.uint8)


def byte_windows(data: np.ndarray, batch: int, length: int, rng: np.random.Generator):
  """``uint8 [batch, length]`` windows of `data` at random offsets."""
  starts = rng.integers(0, len(data) - length, size=batch)
  return np.stack([data[s : s + length] for s in starts])


# --------------------------------------------------------------------------- running prose
def paragraphs(modules: tuple[str, ...]) -> list[str]:
  """Deduplicated prose paragraphs of `modules`' docstrings (at least `MIN_WORDS` words, a
  capital first), in module, file and source order: the running English an LLM is scored on."""
  seen: dict[str, None] = {}
  for name in modules:
    for path in module_files(name):
      for doc in docstrings(path):
        seen.update((p, None) for p in prose_paragraphs(doc) if _is_paragraph(p))
  return list(seen)


def _is_paragraph(text: str) -> bool:
  return len(text.split()) >= MIN_WORDS and text[0].isupper()


def _disjoint(extract) -> tuple[list[str], list[str]]:
  """``(calibration, evaluation)`` items of the two module lists, evaluation minus calibration."""
  calibration = extract(CALIBRATION_MODULES)
  taken = set(calibration)
  return calibration, [x for x in extract(EVALUATION_MODULES) if x not in taken]


@functools.lru_cache(maxsize=1)
def _prose_pools() -> tuple[tuple[str, ...], tuple[str, ...]]:
  calibration, evaluation = _disjoint(paragraphs)
  return tuple(calibration), tuple(evaluation)


def calibration_text(max_chars: int | None = None) -> str:
  """Calibration prose: `CALIBRATION_MODULES`' docstring paragraphs, one a line, in source
  order, cut at a paragraph boundary before `max_chars` (None: all)."""
  return _joined(_prose_pools()[0], max_chars)


def evaluation_text(max_chars: int | None = None) -> str:
  """Held-out prose, disjoint from `calibration_text`: `EVALUATION_MODULES`' paragraphs."""
  return _joined(_prose_pools()[1], max_chars)


def _joined(pool: tuple[str, ...], max_chars: int | None) -> str:
  out, total = [], 0
  for p in pool:
    if max_chars is not None and total + len(p) + 1 > max_chars:
      break
    out.append(p)
    total += len(p) + 1
  return "\n".join(out)


def read_utf8(path: str | os.PathLike, what: str = "file") -> str:
  """The text of a user's file; errors name it (`what`, the path) and say what to give."""
  path = Path(path)
  if path.is_dir():
    raise ValueError(f"{what} {path} is a folder; give a UTF-8 text file.")
  if not path.is_file():
    raise FileNotFoundError(f"{what} {path}: no such file (give a UTF-8 text file).")
  try:
    return path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(
      f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8."
    ) from None


def read_text(path: str | os.PathLike, what: str = "--text") -> str:
  """A user's UTF-8 text file, with a clear error when it is missing, not UTF-8 or empty."""
  text = read_utf8(path, what)
  if not text.strip():
    raise ValueError(f"{what} {path} is empty.")
  return text
