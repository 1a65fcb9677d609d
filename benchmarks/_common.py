"""Shared problem builders and timing helpers for the benchmarks.

The problems reproduce those behind the figures in DESIGN.md §6 so numbers stay
comparable: dense `A = U diag(s) Vᵀ` with `U`, `V` from QR of seeded Gaussian matrices
and `s` geometric from 1 to 1/cond; `b = A x_true`; the MLP is 10-128-128-1 tanh on
1000 Gaussian inputs.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np


def dense_problem(m, n, cond, *, seed=0, dtype=np.float64, consistent=True):
    rng = np.random.default_rng(seed)
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    s = np.geomspace(1.0, 1.0 / cond, k)
    a = (u * s) @ v.T
    x_true = rng.standard_normal(n)
    b = a @ x_true
    if not consistent:
        # add a component orthogonal to range(A), of norm 0.1‖A x_true‖
        z = rng.standard_normal(m)
        z -= u @ (u.T @ z)
        b = b + 0.1 * np.linalg.norm(b) * z / np.linalg.norm(z)
    return a.astype(dtype), b.astype(dtype), x_true.astype(dtype)


def mlp_init(key, sizes, dtype=jnp.float64):
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        key, k1 = jax.random.split(key)
        w = jax.random.normal(k1, (fan_in, fan_out), dtype) / np.sqrt(fan_in)
        params.append({"w": w, "b": jnp.zeros((fan_out,), dtype)})
    return params


def mlp_apply(params, inputs):
    h = inputs
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    out = h @ params[-1]["w"] + params[-1]["b"]
    return out[:, 0]


def mlp_problem(num_points=1000, sizes=(10, 128, 128, 1), seed=0, dtype=jnp.float64):
    key = jax.random.key(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    params = mlp_init(k1, sizes, dtype)
    inputs = jax.random.normal(k2, (num_points, sizes[0]), dtype)
    b = jax.random.normal(k3, (num_points,), dtype)
    return params, inputs, b


def timeit(fn, *args, repeats=5):
    """Compile time and median wall time of `fn(*args)` (fn already jitted)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_and_first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return compile_and_first, float(np.median(times))


def _subjaxprs(eqn):
    for value in eqn.params.values():
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if hasattr(item, "jaxpr") and hasattr(item, "consts"):
                yield item.jaxpr
            elif hasattr(item, "eqns"):
                yield item


def krylov_solves(jaxpr) -> set[int]:
    """Possible numbers of Krylov solves along the execution paths of a jaxpr.

    A solve is a `while` loop (this package's and matfree's iterations) or a lineax
    `linear_solve` primitive (whose loop is hidden inside the primitive); a `cond`
    contributes the union over its branches.
    """
    totals = {0}
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "cond":
            here = set()
            for branch in eqn.params["branches"]:
                here |= krylov_solves(branch.jaxpr)
        elif name in ("while", "linear_solve"):
            here = {1}
        else:
            here = {0}
            for sub in _subjaxprs(eqn):
                counts = krylov_solves(sub)
                here = {a + c for a in here for c in counts}
        totals = {a + c for a in totals for c in here}
    return totals
