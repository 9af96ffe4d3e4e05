"""Test set-up: 8 simulated CPU devices (for sharding tests) and hypothesis profiles."""

import os

# Must be set before jax initialises its backends.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
from hypothesis import HealthCheck, settings

# Every implicit promotion is an error in the tests (float32 with float16 scales, int8 codes
# with float32...): the library casts explicitly, so results do not depend on the user's mode.
jax.config.update("jax_numpy_dtype_promotion", "strict")

settings.register_profile(
  "default",
  max_examples=6,  # every example compiles anew; HYPOTHESIS_PROFILE=thorough runs 400
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
