"""Test configuration: float64 everywhere, strict dtype promotion, seeded hypothesis."""

import os

import hypothesis
import jax


# At import time, before any test module creates an array.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")

# "ci": reproducible (derandomize seeds every test from its own source), no
# per-example deadline (the first example of a shape pays for XLA compilation), no
# example database on disk, and few examples because each new shape compiles anew.
hypothesis.settings.register_profile(
    "ci",
    deadline=None,
    max_examples=20,
    derandomize=True,
    database=None,
    print_blob=True,
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
