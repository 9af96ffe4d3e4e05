"""Rules: validation, first-match selection, default rules, and what the plan makes of them."""

import re
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxquant as jq
from jaxquant.rules import Rule, default_rules, first_match
from jaxquant.transforms import selection

SPEC_STRINGS = [
  None,
  "int8",
  "int8:token",
  "int4:g128:asym",
  "int4:g128:asym:mse:scale=f16",
  "nf4:g64",
  "fp8_e4m3",
  "bf16",
  "uint8:tensor",
]
SEGMENTS = [
  "encoder",
  "decoder",
  "layer_0",
  "layer_1",
  "attn",
  "mlp",
  "query",
  "embed",
  "word_embeddings",
  "kernel",
  "bias",
  "scale",
]
PATTERNS = [
  ".*",
  "kernel",
  "kernel$",
  "^encoder/",
  "layer_[01]",
  "embed",
  r"(^|/)attn(/|$)",
  "query|mlp",
  "^decoder/layer_1/mlp/kernel$",
  "bias$",
  "nothing",
]

paths = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5).map("/".join)
rules_lists = st.lists(
  st.builds(Rule, st.sampled_from(PATTERNS), st.sampled_from(SPEC_STRINGS)), max_size=6
)


# --------------------------------------------------------------------------- Rule
@pytest.mark.parametrize("pattern", ["(", "[a-", "*kernel", "a{2,1}"])
def test_invalid_regex_is_a_value_error_that_says_how_to_escape(pattern):
  with pytest.raises(ValueError, match="not a valid regular expression") as e:
    Rule(pattern, "int8")
  assert repr(pattern) in str(e.value) and "re.escape" in str(e.value)


def test_spec_strings_are_parsed():
  rule = Rule("kernel", "int4:g128:asym", "int8:token")
  assert rule.weight == jq.QuantSpec.parse("int4:g128:asym")
  assert rule.act == jq.QuantSpec.parse("int8:token")
  assert isinstance(rule.weight, jq.QuantSpec) and isinstance(rule.act, jq.QuantSpec)
  assert Rule("kernel").weight is None and Rule("kernel").act is None
  spec = jq.QuantSpec.parse("nf4:g64")
  assert Rule("kernel", spec).weight is spec


@pytest.mark.parametrize("which", ["weight", "act"])
def test_bad_spec_error_names_the_pattern_and_the_field(which):
  with pytest.raises(ValueError) as e:
    Rule("my/odd/pattern", **{which: "int3"})
  message = str(e.value)
  assert "'my/odd/pattern'" in message and which in message and "int3" in message


@pytest.mark.parametrize("batch_dims", [-1, 1.0, "1", None, 0.5])
def test_batch_dims_must_be_a_non_negative_int(batch_dims):
  with pytest.raises(ValueError, match="batch_dims must be a non-negative int") as e:
    Rule("layers", "int8", batch_dims=batch_dims)
  assert "'layers'" in str(e.value)


@given(
  st.sampled_from(PATTERNS),
  st.sampled_from(SPEC_STRINGS),
  st.sampled_from(SPEC_STRINGS),
  st.booleans(),
  st.integers(0, 3),
)
def test_to_dict_round_trips(pattern, weight, act, expect_match, batch_dims):
  rule = Rule(pattern, weight, act, expect_match, batch_dims)
  d = rule.to_dict()
  assert Rule(**d) == rule
  assert d["pattern"] == pattern
  assert d["weight"] == (None if weight is None else str(jq.QuantSpec.parse(weight)))
  assert d["act"] == (None if act is None else str(jq.QuantSpec.parse(act)))
  assert ("expect_match" in d) == (not expect_match)
  assert ("batch_dims" in d) == (batch_dims != 0)


# --------------------------------------------------------------------------- first_match
def reference_first_match(path, rules):
  for i, rule in enumerate(rules):
    if re.search(rule.pattern, path):
      return i
  return None


@given(paths, rules_lists)
def test_first_match_equals_a_plain_search_loop(path, rules):
  assert first_match(path, rules) == reference_first_match(path, rules)


def test_first_match_wins_and_none_when_nothing_matches():
  rules = [Rule("query", "int4:g128"), Rule("kernel", "int8"), Rule(".*")]
  assert first_match("attn/query/kernel", rules) == 0
  assert first_match("attn/key/kernel", rules) == 1
  assert first_match("attn/key/bias", rules) == 2
  assert first_match("attn/key/bias", rules[:2]) is None
  assert first_match("anything", []) is None


# --------------------------------------------------------------------------- default_rules
def test_default_rules_keep_embeddings_and_quantize_kernels():
  rules = default_rules()
  assert len(rules) == 2
  assert rules[0].weight is None and rules[0].expect_match is False
  assert rules[1].weight == jq.QuantSpec.parse("int8") and rules[1].expect_match is True
  for path in [
    "embed/embedding",
    "bert/word_embeddings/embedding",
    "token_embedder/embedding",
    "model/embed_tokens/weight",
  ]:
    assert first_match(path, rules) == 0, path
  for path in ["encoder/layer_0/query/kernel", "mlp/dense/kernel", "lm_head/kernel"]:
    assert first_match(path, rules) == 1, path
  params = {"embed": {"embedding": jnp.ones((50, 16))}, "dense": {"kernel": jnp.ones((16, 8))}}
  rows = {r.path: r for r in jq.plan(params, rules).rows}
  assert rows["embed/embedding"].spec is None and rows["embed/embedding"].note == "kept by rule"
  assert rows["dense/kernel"].spec == jq.QuantSpec.parse("int8")


def test_default_rules_take_the_given_specs():
  rules = default_rules("int4:g128", act="int8:token", embeddings="int8")
  assert rules[0].weight == jq.QuantSpec.parse("int8") and rules[0].act is None
  assert rules[1].weight == jq.QuantSpec.parse("int4:g128")
  assert rules[1].act == jq.QuantSpec.parse("int8:token")


# --------------------------------------------------------------------------- selection, plan
def test_selection_keeps_what_is_not_a_contraction_weight():
  rules = [Rule(r"kept/", None), Rule(".*", "int8")]
  spec = jq.QuantSpec.parse("int8")
  cases = {
    "dense/kernel": (jnp.ones((8, 4)), (1, spec, "")),
    "dense/bias": (jnp.ones(4), (1, None, "kept (<2 dims)")),
    "general/bias": (jnp.ones((2, 4)), (1, None, "kept (bias or norm)")),
    "norm/scale": (jnp.ones(8), (1, None, "kept (<2 dims)")),
    "norm2d/scale": (jnp.ones((2, 8)), (1, None, "kept (bias or norm)")),
    "bn/mean": (jnp.ones((2, 8)), (1, None, "kept (bias or norm)")),
    "step": (jnp.ones(()), (1, None, "kept (<2 dims)")),
    "ids/table": (jnp.ones((8, 4), jnp.int32), (1, None, "kept (int32)")),
    "mask/kernel": (jnp.ones((8, 4), bool), (1, None, "kept (bool)")),
    "kept/kernel": (jnp.ones((8, 4)), (0, None, "kept by rule")),
  }
  for path, (value, expected) in cases.items():
    assert selection(path, value, rules) == expected, path
  assert selection("dense/kernel", jnp.ones((8, 4)), []) == (None, None, "no rule")
  q = jq.quantize(jnp.ones((8, 4)), spec)
  assert selection("dense/kernel", q, rules) == (1, None, "already quantized")


def test_plan_rows_carry_the_notes_and_bytes():
  params = {
    "dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)},
    "ids": jnp.zeros((4, 4), jnp.int32),
  }
  spec = jq.QuantSpec.parse("int4:g32")
  p = jq.plan(params, [Rule(".*", spec)])
  rows = {r.path: r for r in p.rows}
  assert rows["dense/kernel"].spec == spec
  assert rows["dense/kernel"].bytes_before == 64 * 32 * 4
  assert rows["dense/kernel"].bytes_after == spec.nbytes((64, 32))
  assert rows["dense/bias"].note == "kept (<2 dims)" and rows["dense/bias"].spec is None
  assert rows["dense/bias"].bytes_after == rows["dense/bias"].bytes_before == 32 * 4
  assert rows["ids"].note == "kept (int32)"
  assert p.bytes_after == spec.nbytes((64, 32)) + 32 * 4 + 16 * 4
  assert [r.path for r in p.quantized] == ["dense/kernel"] and p.unused_rules == ()


def test_batch_dims_rule_quantizes_each_slice_of_a_stacked_kernel():
  spec = jq.QuantSpec.parse("int4:g32")
  rules = [Rule("layers", spec, batch_dims=1)]
  params = {"layers": {"kernel": jnp.ones((3, 64, 32)), "flat": jnp.ones((64, 32))}}
  rows = {r.path: r for r in jq.plan(params, rules).rows}
  stacked = rows["layers/kernel"]
  assert stacked.spec == spec and stacked.batch_dims == 1
  assert stacked.bytes_after == 3 * spec.nbytes((64, 32))
  flat = rows["layers/flat"]
  assert flat.spec is None and flat.note == "kept (<2 dims)" and flat.batch_dims == 0
  assert flat.bytes_after == flat.bytes_before
  # what quantize_params stores is what the plan said, and no scale mixes two layers
  w = np.random.default_rng(0).normal(size=(3, 64, 32)).astype(np.float32)
  w *= np.array([1.0, 100.0, 0.01], np.float32)[:, None, None]
  q = jq.quantize_params({"layers": {"kernel": w}}, rules)["layers"]["kernel"]
  assert isinstance(q, jq.QArray) and q.nbytes == stacked.bytes_after
  deq = np.asarray(jq.dequantize(q))
  for i in range(3):
    alone = np.asarray(jq.dequantize(jq.quantize(w[i], spec)))
    np.testing.assert_allclose(deq[i], alone, rtol=1e-6, atol=0)


def test_unused_rule_warns_unless_no_match_is_expected():
  params = {"dense": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}}
  rules = [Rule("kernel", None), Rule("absent_layer", "int8"), Rule("dense/kernel", "int8")]
  p = jq.plan(params, rules)
  assert p.unused_rules == (rules[1], rules[2])  # the last one is shadowed by the first
  with pytest.warns(UserWarning) as record:
    out = jq.quantize_params(params, rules)
  messages = [str(w.message) for w in record if "matched no parameter" in str(w.message)]
  assert len(messages) == 2
  assert "'absent_layer'" in messages[0] and "'dense/kernel'" in messages[1]
  np.testing.assert_array_equal(out["dense"]["kernel"], params["dense"]["kernel"])
  quiet = [Rule("kernel", None), Rule("absent_layer", "int8", expect_match=False)]
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    jq.quantize_params(params, quiet)
  assert not [w for w in record if "matched no parameter" in str(w.message)]
