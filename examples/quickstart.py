"""Quickstart: two matrix-free least-squares problems, checked against SciPy.

1. A damped (Tikhonov-regularised) least-squares problem with a random sparse matrix,
   stored as a `jax.experimental.sparse.BCOO` array and wrapped as a lineax
   `FunctionLinearOperator`: only products `A x` are written down; LSMR obtains the
   products with the adjoint by transposing that function.
2. A Levenberg–Marquardt step for a small multilayer perceptron: the operator is the
   Jacobian of the network's outputs with respect to its parameters, a
   `lineax.JacobianLinearOperator` whose input is the parameter dictionary itself.

Both solutions are compared with `scipy.sparse.linalg.lsmr` on the same problem, and
the script exits with a non-zero status if they disagree.

Run with `MFL_EXAMPLE_SMALL=1` for a smaller, faster version (as CI does).
"""

import os
import sys
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import numpy as np
import scipy.sparse
import scipy.sparse.linalg
from jax.experimental import sparse

import matfree_lstsq as mfl


# Double precision, enabled before any array is created.
jax.config.update("jax_enable_x64", True)

SMALL = os.environ.get("MFL_EXAMPLE_SMALL", "0") not in ("", "0")
TOL = 1e-10  # atol = btol for both LSMR implementations
AGREEMENT = 1e-6  # maximum relative difference between the two solutions


def report(title: str, sol: mfl.Solution, seconds: float) -> None:
    print(f"\n{title}")
    ok = bool(sol.result == mfl.RESULTS.successful)
    print(f"  result   : {'successful' if ok else 'not successful'}")
    print(f"  time     : {seconds:.3f} s (including compilation)")
    for key, value in sol.stats.items():
        print(f"  {key:<9}: {np.asarray(value).item():.6g}")


def compare(name: str, ours: np.ndarray, scipy_out: tuple) -> bool:
    """Print SciPy's figures next to ours and say whether the solutions agree."""
    x_ref, istop, itn = scipy_out[0], scipy_out[1], scipy_out[2]
    rel = np.linalg.norm(ours - x_ref) / max(np.linalg.norm(x_ref), 1e-300)
    ok = bool(np.isfinite(rel) and rel <= AGREEMENT)
    print(f"  SciPy lsmr: {itn} steps, istop {istop}")
    print(f"  relative difference to SciPy: {rel:.2e} ({'ok' if ok else 'MISMATCH'})")
    if not ok:
        print(f"{name}: solutions differ by more than {AGREEMENT:g}", file=sys.stderr)
    return ok


# ---------------------------------------------------------------------------------
# 1. Damped least squares with a sparse matrix.
# ---------------------------------------------------------------------------------


def sparse_problem() -> bool:
    m, n = (2_000, 500) if SMALL else (20_000, 5_000)
    nnz = 20 * n  # about 20 non-zeros per column, 5 per row
    damp = 0.5
    rng = np.random.default_rng(seed=0)
    rows, cols = rng.integers(m, size=nnz), rng.integers(n, size=nnz)
    values = rng.standard_normal(nnz)
    A_sp = scipy.sparse.coo_matrix((values, (rows, cols)), shape=(m, n)).tocsr()
    b_np = rng.standard_normal(m)

    A = sparse.BCOO.from_scipy_sparse(A_sp)
    b = jnp.asarray(b_np)
    # Only the forward product is given; the solver derives x ↦ Aᵀu by transposition.
    operator = lx.FunctionLinearOperator(
        lambda x: A @ x, jax.ShapeDtypeStruct((n,), b.dtype)
    )
    solver = mfl.LSMR(atol=TOL, btol=TOL)

    start = time.perf_counter()
    sol = mfl.lstsq(operator, b, solver, damp=damp)
    x = jax.block_until_ready(sol.value)
    seconds = time.perf_counter() - start
    report(
        f"1. sparse {m}x{n} matrix ({A_sp.nnz} non-zeros), damp={damp}",
        sol,
        seconds,
    )
    scipy_out = scipy.sparse.linalg.lsmr(A_sp, b_np, damp=damp, atol=TOL, btol=TOL)
    return compare("sparse problem", np.asarray(x), scipy_out)


# ---------------------------------------------------------------------------------
# 2. A Levenberg–Marquardt step for a small MLP, on its parameter Jacobian.
# ---------------------------------------------------------------------------------


def init_mlp(key: jax.Array, sizes: list[int]) -> dict[str, jax.Array]:
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, wkey = jax.random.split(key)
        params[f"W{i}"] = jax.random.normal(wkey, (fan_in, fan_out)) / np.sqrt(fan_in)
        params[f"b{i}"] = jnp.zeros(fan_out)
    return params


def mlp(params: dict[str, jax.Array], inputs: jax.Array) -> jax.Array:
    num_layers = len(params) // 2
    h = inputs
    for i in range(num_layers):
        h = h @ params[f"W{i}"] + params[f"b{i}"]
        if i < num_layers - 1:
            h = jnp.tanh(h)
    return h[:, 0]


def jacobian_problem() -> bool:
    num_data, width = (100, 16) if SMALL else (500, 64)
    damp = 1.0
    key_x, key_p = jax.random.split(jax.random.PRNGKey(0))
    inputs = jax.random.normal(key_x, (num_data, 2))
    targets = jnp.sin(inputs[:, 0]) * jnp.cos(inputs[:, 1])
    params = init_mlp(key_p, [2, width, width, 1])

    # J: parameters (a dict of arrays) -> predictions (num_data,).
    operator = lx.JacobianLinearOperator(lambda p, _: mlp(p, inputs), params)
    residual = targets - mlp(params, inputs)

    # Levenberg–Marquardt step: argmin_δ ‖J δ − r‖² + λ²‖δ‖², in parameter space.
    start = time.perf_counter()
    sol = mfl.lstsq(operator, residual, mfl.LSMR(atol=TOL, btol=TOL), damp=damp)
    step = jax.block_until_ready(sol.value)
    seconds = time.perf_counter() - start
    num_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    report(
        f"2. MLP Jacobian, {num_data} data x {num_params} parameters, damp={damp}",
        sol,
        seconds,
    )
    print(f"  step is a {type(step).__name__} with keys {sorted(step)}")

    # SciPy needs the Jacobian as a dense matrix and the parameters as one vector. Its
    # rows are per-example gradients, laid out in the order `ravel_pytree` uses.
    def row(x):
        grad = jax.grad(lambda p: mlp(p, x[None])[0])(params)
        return jax.flatten_util.ravel_pytree(grad)[0]

    J = jax.jit(jax.vmap(row))(inputs)
    scipy_out = scipy.sparse.linalg.lsmr(
        np.asarray(J), np.asarray(residual), damp=damp, atol=TOL, btol=TOL
    )
    ours = np.asarray(jax.flatten_util.ravel_pytree(step)[0])
    ok = compare("MLP problem", ours, scipy_out)

    loss_before = jnp.mean(residual**2)
    new_params = jax.tree_util.tree_map(jnp.add, params, step)
    loss_after = jnp.mean((targets - mlp(new_params, inputs)) ** 2)
    print(f"  mean squared error: {loss_before:.4g} before, {loss_after:.4g} after")
    return ok


if __name__ == "__main__":
    print(f"matfree_lstsq {mfl.__version__}, jax {jax.__version__}, small={SMALL}")
    results = [sparse_problem(), jacobian_problem()]
    if not all(results):
        sys.exit(1)
    print("\nAll solutions agree with SciPy.")
