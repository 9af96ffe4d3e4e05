"""The wheel ships every subpackage and the recipes (a non-editable install works)."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_for_the_wheel():
  config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  listed = set(config["packages"])
  inits = (ROOT / "jaxquant").rglob("__init__.py")
  found = {".".join(p.parent.relative_to(ROOT).parts) for p in inits}
  assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
  assert "*.yaml" in config["package-data"]["jaxquant.recipes"]
  assert list((ROOT / "jaxquant" / "recipes").glob("*.yaml")), (
    "the recipes ship beside their loader"
  )
