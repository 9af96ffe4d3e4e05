"""The quantization guides (docs/guide.md, docs/guide.zh.md): every snippet runs, both guides
carry the same code, and the INT8 / INT4 / mixed-precision sections are all filled in."""

import io
import re
import tokenize
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
GUIDES = ["guide.md", "guide.zh.md"]

# (section, subheading) pairs every guide must fill: the seed's three empty sections, each with
# "how it is computed" and "when to use it, and how".
SECTIONS = {
  "guide.md": (
    [r"INT8 quantization", r"INT4 quantization", r"Mixed-precision quantization"],
    [r"How it is computed", r"When to use it, and how"],
  ),
  "guide.zh.md": (
    [r"INT8\s*量化", r"INT4\s*量化", r"混合精度量化"],
    [r"计算过程", r"适用阶段及策略"],
  ),
}

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(name: str) -> list[tuple[int, str]]:
  """``[(line number, code)]`` of the fenced ```python blocks of a guide, in order."""
  text = (DOCS / name).read_text(encoding="utf-8")
  return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in _FENCE.finditer(text)]


def code_tokens(code: str) -> list[tuple[int, str]]:
  """The code's tokens without comments and layout, so that translated comments compare equal."""
  skip = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENCODING,
    tokenize.ENDMARKER,
  }
  toks = tokenize.generate_tokens(io.StringIO(code).readline)
  return [(t.type, t.string) for t in toks if t.type not in skip]


# The Chinese guide's code is token for token the English one's (test_guides_share_the_same_code),
# so running it again is a slow-set duplicate.
@pytest.mark.parametrize("name", [GUIDES[0], pytest.param(GUIDES[1], marks=pytest.mark.slow)])
def test_guide_snippets_run(name):
  blocks = python_blocks(name)
  assert len(blocks) >= 10, (
    f"docs/{name}: expected the guide's python snippets, found {len(blocks)}"
  )
  namespace = {"__name__": f"guide_{name.replace('.', '_')}"}
  for i, (line, code) in enumerate(blocks, 1):
    first = next((ln.strip() for ln in code.splitlines() if ln.strip()), "")
    try:
      exec(compile(code, f"docs/{name}:{line}", "exec"), namespace)
    except Exception as e:
      pytest.fail(
        f"docs/{name}, python block {i} of {len(blocks)} (starting at line {line}: {first!r}) "
        f"failed: {type(e).__name__}: {e}",
        pytrace=True,
      )


def test_guides_share_the_same_code():
  en, zh = (python_blocks(n) for n in GUIDES)
  assert len(en) == len(zh), f"docs/guide.md has {len(en)} python blocks, guide.zh.md {len(zh)}"
  for i, ((l_en, c_en), (l_zh, c_zh)) in enumerate(zip(en, zh), 1):
    assert code_tokens(c_en) == code_tokens(c_zh), (
      f"python block {i} differs between docs/guide.md (line {l_en}) and docs/guide.zh.md "
      f"(line {l_zh}) beyond comments; keep the code identical."
    )


def _sections(text: str, level: int) -> list[tuple[str, str]]:
  """``[(heading, body)]`` for the headings of exactly `level` '#'s, outside code fences.

  A body ends at the next heading of the same or a higher level.
  """
  out: list[tuple[str | None, list[str]]] = []
  fence = False
  for line in text.splitlines():
    if line.startswith("```"):
      fence = not fence
    m = None if fence else re.match(r"^(#+)\s+(.*?)\s*$", line)
    if m and len(m.group(1)) <= level:
      out.append((m.group(2) if len(m.group(1)) == level else None, []))
    elif out:
      out[-1][1].append(line)
  return [(h, "\n".join(body)) for h, body in out if h is not None]


@pytest.mark.parametrize("name", GUIDES)
def test_guide_sections_are_filled(name):
  text = (DOCS / name).read_text(encoding="utf-8")
  sections, subheadings = SECTIONS[name]
  top = _sections(text, 2)
  for section in sections:
    found = [body for heading, body in top if re.fullmatch(section, heading, re.I)]
    assert len(found) == 1, f"docs/{name}: expected one '## {section}' section, found {len(found)}"
    subs = _sections(found[0], 3)
    for sub in subheadings:
      bodies = [body for heading, body in subs if re.fullmatch(sub, heading, re.I)]
      assert len(bodies) == 1, f"docs/{name}: section {section!r} needs one '### {sub}'"
      prose = re.sub(r"```.*?```", "", bodies[0], flags=re.S)
      assert len("".join(prose.split())) >= 200, (
        f"docs/{name}: '{section} / {sub}' is (nearly) empty"
      )


def test_readme_links_the_guides():
  readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
  for name in GUIDES:
    assert f"docs/{name}" in readme, f"README.md should link docs/{name}"
