"""Pytree operators and vectors, complex and float32 dtypes, `jit` and `vmap`."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import (
    Wrapped,
    dense_problem,
    matrix_operator,
    pytree_function_operator,
    pytree_operator,
    reference_solution,
)

import matfree_lstsq as mfl


# Shared solver instances: their hyperparameters are static under `jit`, so sharing
# them lets the tests reuse compilations.
TIGHT = {
    "LSMR": mfl.LSMR(atol=1e-10, btol=1e-10, max_steps=100),
    "LSQR": mfl.LSQR(atol=1e-10, btol=1e-10, max_steps=100),
}
DEFAULT = {"LSMR": mfl.LSMR(), "LSQR": mfl.LSQR()}
NAMES = ["LSMR", "LSQR"]


def _flat(tree) -> np.ndarray:
    return Wrapped.flat(tree)


def _problem(seed: int = 3):
    """30 × 20, inconsistent, well conditioned: the tight tolerances are met in
    fewer than 20 steps, before the Krylov space is exhausted, so the stopping step
    and the statistics do not depend on rounding noise."""
    return dense_problem(30, 20, cond=1.5, seed=seed, consistent=False)


def _leaf_dtypes(tree) -> set:
    return {jnp.dtype(leaf.dtype) for leaf in jax.tree_util.tree_leaves(tree)}


# ---------------------------------------------------------------------------------
# Pytree operators agree with their dense flattening
# ---------------------------------------------------------------------------------

PYTREE_CASES = [
    ("pytree_function", 0.5, True),
    ("pytree", 0.0, False),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("kind", "damp", "with_x0"), PYTREE_CASES)
def test_pytree_operator_matches_dense(name, kind, damp, with_x0):
    solver = TIGHT[name]
    p = _problem()
    wrap = {"pytree_function": pytree_function_operator, "pytree": pytree_operator}[
        kind
    ](p.A)
    # Dict in, tuple out.
    assert isinstance(wrap.operator.in_structure(), dict)
    assert isinstance(wrap.operator.out_structure(), tuple)
    x0 = np.linspace(-1.0, 1.0, 20) if with_x0 else None

    sol = mfl.lstsq(
        wrap.operator,
        wrap.vector(p.b),
        solver,
        damp=damp,
        x0=None if x0 is None else wrap.x(x0),
        throw=False,
    )
    ref = mfl.lstsq(
        jnp.asarray(p.A),
        jnp.asarray(p.b),
        solver,
        damp=damp,
        x0=None if x0 is None else jnp.asarray(x0),
        throw=False,
    )
    assert bool(sol.result == mfl.RESULTS.successful)

    # The solution keeps the operator's input structure ...
    assert jax.tree_util.tree_structure(sol.value) == jax.tree_util.tree_structure(
        wrap.operator.in_structure()
    )
    for leaf, struct in zip(
        jax.tree_util.tree_leaves(sol.value),
        jax.tree_util.tree_leaves(wrap.operator.in_structure()),
    ):
        assert leaf.shape == struct.shape
        assert leaf.dtype == struct.dtype
    # ... and is the dense solution, reached in the same number of steps.
    x = _flat(sol.value)
    np.testing.assert_allclose(x, np.asarray(ref.value), rtol=1e-10, atol=1e-12)
    assert int(sol.stats["num_steps"]) == int(ref.stats["num_steps"])
    assert int(sol.stats["istop"]) == int(ref.stats["istop"])
    for key in ("norm_r", "norm_A", "cond_A", "norm_x"):
        np.testing.assert_allclose(
            sol.stats[key], ref.stats[key], rtol=1e-8, atol=0, err_msg=key
        )
    # ‖Aᴴr‖ is at the level of the stopping tolerance, where rounding shows.
    scale = solver.atol * float(ref.stats["norm_A"]) * float(ref.stats["norm_r"])
    np.testing.assert_allclose(sol.stats["norm_Ar"], ref.stats["norm_Ar"], atol=scale)
    # And both are the true minimiser.
    expected = reference_solution(p.A, p.b, damp=damp, x0=x0)
    np.testing.assert_allclose(x, expected, rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------------------------
# Complex
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "damp", "kind"),
    [
        ("LSMR", (14, 6), 0.0, "matrix"),
        ("LSQR", (14, 6), 0.0, "matrix"),
        ("LSMR", (6, 14), 0.4, "pytree"),
    ],
)
def test_complex(name, shape, damp, kind):
    solver = TIGHT[name]
    # Tall: an inconsistent right-hand side. Wide: a null space, with damping and a
    # complex x0 (which changes the answer).
    tall = shape[0] > shape[1]
    p = dense_problem(*shape, cond=10.0, seed=5, consistent=not tall, complex=True)
    assert np.iscomplexobj(p.A)
    wrap = {"matrix": matrix_operator, "pytree": pytree_function_operator}[kind](p.A)
    x0 = None if tall else np.linspace(0.0, 1.0, shape[1]) * (1.0 - 0.5j)
    sol = mfl.lstsq(
        wrap.operator,
        wrap.vector(p.b),
        solver,
        damp=damp,
        x0=None if x0 is None else wrap.x(x0),
    )
    assert _leaf_dtypes(sol.value) == {jnp.dtype(jnp.complex128)}
    for key in ("norm_r", "norm_Ar", "norm_A", "cond_A", "norm_x"):
        assert sol.stats[key].dtype == jnp.float64, key
    expected = reference_solution(p.A, p.b, damp=damp, x0=x0)
    np.testing.assert_allclose(_flat(sol.value), expected, rtol=1e-8, atol=1e-10)
    # The complex solution is genuinely complex (a real-arithmetic bug would lose
    # the imaginary part).
    assert np.abs(np.imag(expected)).max() > 1e-2


# ---------------------------------------------------------------------------------
# float32
# ---------------------------------------------------------------------------------


def _clustered(m: int, n: int, seed: int = 0):
    """A float64 matrix with three distinct singular values (1, 2, 3): Krylov
    methods converge in about three steps, well before the step limit."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((n, k)))
    s = np.resize([1.0, 2.0, 3.0], k)
    return (U * s) @ V.T, rng.standard_normal(m)


@pytest.mark.parametrize(
    ("name", "shape", "kind"),
    [("LSMR", (30, 10), "matrix"), ("LSQR", (10, 30), "pytree")],
)
def test_float32_with_x64_on(name, shape, kind):
    solver = DEFAULT[name]
    A, b = _clustered(*shape)
    wrap = {"matrix": matrix_operator, "pytree": pytree_function_operator}[kind](
        A.astype(np.float32)
    )
    sol = mfl.lstsq(wrap.operator, wrap.vector(b.astype(np.float32)), solver)
    assert _leaf_dtypes(sol.value) == {jnp.dtype(jnp.float32)}
    for key in ("norm_r", "norm_Ar", "norm_A", "cond_A", "norm_x"):
        assert sol.stats[key].dtype == jnp.float32, key
    # Stopped on a tolerance test, well before the step limit.
    assert int(sol.stats["istop"]) in (1, 2, 4, 5)
    assert bool(sol.result == mfl.RESULTS.successful)
    assert int(sol.stats["num_steps"]) < min(shape)
    expected = np.linalg.pinv(A) @ b
    np.testing.assert_allclose(
        _flat(sol.value).astype(np.float64),
        expected,
        rtol=0,
        atol=1e-5 * np.abs(expected).max(),
    )


_X64_OFF_SCRIPT = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    import matfree_lstsq as mfl

    assert not jax.config.jax_enable_x64
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((30, 10)))
    V, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    A = (U * np.resize([1.0, 2.0, 3.0], 10)) @ V.T
    b = rng.standard_normal(30)
    expected = np.linalg.pinv(A) @ b
    for solver in (mfl.LSMR(), mfl.LSQR()):
        sol = mfl.lstsq(
            jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32), solver,
            throw=False,
        )
        assert sol.value.dtype == jnp.float32, sol.value.dtype
        for key, value in sol.stats.items():
            assert value.dtype in (jnp.float32, jnp.int32), (key, value.dtype)
        istop = int(sol.stats["istop"])
        assert istop != 7, (type(solver).__name__, sol.stats)
        assert istop in (1, 2, 4, 5), istop
        assert bool(sol.result == mfl.RESULTS.successful)
        err = np.abs(np.asarray(sol.value, np.float64) - expected).max()
        assert err <= 1e-5 * np.abs(expected).max(), err
    print("X64-OFF-OK")
    """
)


def test_float32_with_x64_off_subprocess():
    env = dict(os.environ, JAX_ENABLE_X64="0", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", _X64_OFF_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "X64-OFF-OK" in out.stdout


# ---------------------------------------------------------------------------------
# jit and vmap
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager(name):
    solver = TIGHT[name]
    p = _problem()
    A, b = jnp.asarray(p.A), jnp.asarray(p.b)
    x0 = jnp.linspace(-1.0, 1.0, 20)

    @jax.jit
    def solve(A, b, x0, damp):
        sol = mfl.lstsq(A, b, solver, x0=x0, damp=damp, throw=False)
        return sol.value, sol.stats["num_steps"], sol.stats["istop"]

    x, steps, istop = solve(A, b, x0, jnp.asarray(0.5))
    ref = mfl.lstsq(A, b, solver, x0=x0, damp=0.5, throw=False)
    np.testing.assert_allclose(x, ref.value, rtol=1e-12, atol=1e-14)
    assert int(steps) == int(ref.stats["num_steps"])
    assert int(istop) == int(ref.stats["istop"]) == 2
    np.testing.assert_allclose(
        x, reference_solution(p.A, p.b, damp=0.5, x0=np.asarray(x0)), rtol=1e-7
    )


def test_jit_with_default_damp():
    # Regression: a concrete default `damp` must not be turned into a traced bool.
    p = _problem()
    A = jnp.asarray(p.A)
    x = jax.jit(lambda b: mfl.lstsq(A, b, TIGHT["LSMR"]).value)(jnp.asarray(p.b))
    np.testing.assert_allclose(x, reference_solution(p.A, p.b), rtol=1e-7)


def test_vmap_over_rhs_matches_loop():
    solver = TIGHT["LSQR"]
    p = _problem()
    A = jnp.asarray(p.A)
    rng = np.random.default_rng(0)
    B = rng.standard_normal((5, 30))
    B[2] = 0.0  # a zero right-hand side: trivially solved, istop 0
    B[4, 3] = np.nan  # a non-finite one: only this one reports it
    B = jnp.asarray(B)

    batched = jax.vmap(lambda b: mfl.lstsq(A, b, solver, throw=False))(B)
    assert batched.value.shape == (5, 20)
    for i in range(5):
        single = mfl.lstsq(A, B[i], solver, throw=False)
        assert int(batched.stats["num_steps"][i]) == int(single.stats["num_steps"])
        assert int(batched.stats["istop"][i]) == int(single.stats["istop"])
        assert bool(np.asarray(batched.result == single.result)[i])
        if i != 4:
            np.testing.assert_allclose(
                batched.value[i], single.value, rtol=1e-10, atol=1e-13
            )
    assert int(batched.stats["istop"][2]) == 0
    np.testing.assert_array_equal(batched.value[2], np.zeros(20))
    nonfinite = np.asarray(batched.result == mfl.RESULTS.nonfinite_input)
    successful = np.asarray(batched.result == mfl.RESULTS.successful)
    np.testing.assert_array_equal(nonfinite, [False, False, False, False, True])
    np.testing.assert_array_equal(successful, [True, True, True, True, False])
    for i in (0, 1, 3):
        np.testing.assert_allclose(
            batched.value[i], reference_solution(p.A, np.asarray(B[i])), rtol=1e-7
        )


def test_vmap_pytree_rhs_with_throw():
    solver = TIGHT["LSMR"]
    p = _problem()
    wrap = pytree_function_operator(p.A)
    rng = np.random.default_rng(1)
    B = rng.standard_normal((3, 30))
    trees = [wrap.vector(b) for b in B]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)

    batched = jax.jit(jax.vmap(lambda b: mfl.lstsq(wrap.operator, b, solver).value))(
        stacked
    )
    for i in range(3):
        row = jax.tree_util.tree_map(lambda x, i=i: x[i], batched)
        np.testing.assert_allclose(
            _flat(row), reference_solution(p.A, B[i]), rtol=1e-7, atol=1e-10
        )


def test_jit_pytree_operator_as_argument():
    """The operator itself is a jit argument (its arrays are traced)."""
    solver = TIGHT["LSQR"]
    p = _problem()
    wrap = pytree_operator(p.A)

    @jax.jit
    def solve(op, b, damp):
        return mfl.lstsq(op, b, solver, damp=damp).value

    x = solve(wrap.operator, wrap.vector(p.b), jnp.asarray(0.0))
    np.testing.assert_allclose(_flat(x), reference_solution(p.A, p.b), rtol=1e-7)
    # A different operator of the same structure: same compiled function, new answer.
    q = _problem(seed=4)
    x = solve(pytree_operator(q.A).operator, wrap.vector(q.b), jnp.asarray(0.0))
    np.testing.assert_allclose(_flat(x), reference_solution(q.A, q.b), rtol=1e-7)


def test_function_operator_on_nested_dicts():
    """A hand-written `FunctionLinearOperator` on dicts with a tuple output (not from
    the registry): nested dict input, leaves of different ranks."""
    rng = np.random.default_rng(2)
    W1 = jnp.asarray(rng.standard_normal((6, 2, 3)))
    W2 = jnp.asarray(rng.standard_normal((6, 4)))
    W3 = jnp.asarray(rng.standard_normal((3, 4)))
    in_struct = {
        "w": jax.ShapeDtypeStruct((2, 3), jnp.float64),
        "nested": {"v": jax.ShapeDtypeStruct((4,), jnp.float64)},
    }

    def fn(x):
        y1 = jnp.einsum("ijk,jk->i", W1, x["w"]) + W2 @ x["nested"]["v"]
        y2 = W3 @ x["nested"]["v"]
        return y1, y2

    op = lx.FunctionLinearOperator(fn, in_struct)
    dense = np.asarray(op.as_matrix())
    assert dense.shape == (9, 10)
    b = rng.standard_normal(9)
    sol = mfl.lstsq(op, (jnp.asarray(b[:6]), jnp.asarray(b[6:])), TIGHT["LSMR"])
    assert sol.value["w"].shape == (2, 3)
    assert sol.value["nested"]["v"].shape == (4,)
    np.testing.assert_allclose(
        _flat(sol.value), np.linalg.pinv(dense) @ b, rtol=1e-7, atol=1e-10
    )
