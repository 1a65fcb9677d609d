"""Reorthogonalisation inside LSMR and LSQR (`reorthogonalise=True` or a window).

Oracle: the dense pseudo-inverse solution. On the ill-conditioned problems below the
plain short recurrences lose orthogonality and are still far from the solution after
ten times min(m, n) steps; with full reorthogonalisation both solvers reach the
solution to rounding error in min(m, n) steps, as Krylov methods do in exact
arithmetic.
"""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import dense_problem, pytree_operator, reference_solution

import matfree_lstsq as mfl


SOLVERS = [mfl.LSMR, mfl.LSQR]


def _rel(x, ref):
    return np.linalg.norm(np.asarray(x) - ref) / np.linalg.norm(ref)


def _solver(cls, reorth, max_steps, **kw):
    # atol = btol = 0: run until the machine-precision tests (or exhaustion) stop it.
    kw = dict(atol=0.0, btol=0.0, conlim=1e20) | kw
    return cls(max_steps=max_steps, reorthogonalise=reorth, **kw)


@pytest.mark.parametrize("cls", SOLVERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "m, n, consistent, bound",
    [(120, 40, True, 1e-9), (40, 120, True, 1e-9), (120, 40, False, 1e-5)],
    ids=["tall", "wide", "tall-inconsistent"],
)
def test_full_reorthogonalisation_converges_where_plain_stalls(
    cls, m, n, consistent, bound
):
    p = dense_problem(m, n, cond=1e6, consistent=consistent)
    ref = reference_solution(p.A, p.b)
    k = min(m, n)
    plain = mfl.lstsq(p.A, p.b, _solver(cls, False, 10 * k), throw=False)
    reorth = mfl.lstsq(p.A, p.b, _solver(cls, True, 10 * k), throw=False)
    # Plain: stalls at max_steps, far from the solution (what the option is for).
    assert int(plain.stats["num_steps"]) == 10 * k
    assert _rel(plain.value, ref) > 1e-2
    # Reorthogonalised: done once the Krylov space is exhausted, to rounding error
    # (cond 1e6: ~cond·ε for consistent systems, ~cond²·ε for inconsistent ones).
    assert int(reorth.stats["num_steps"]) <= k + 1
    assert reorth.result == mfl.RESULTS.successful
    assert _rel(reorth.value, ref) < bound


@pytest.mark.parametrize("cls", SOLVERS, ids=lambda c: c.__name__)
def test_invariant_subspace_breakdown_stops_cleanly(cls):
    """`b` lies in a 3-dimensional invariant subspace: the Krylov space is exhausted
    after 3 steps, the next Golub–Kahan coefficient is rounding noise and counts as
    zero; the iteration stops with the exact solution and no NaN."""
    rng = np.random.default_rng(3)
    A = np.diag(np.linspace(1.0, 2.0, 12))
    b = np.zeros(12)
    b[[1, 5, 9]] = rng.standard_normal(3)
    sol = mfl.lstsq(A, b, _solver(cls, True, 50), throw=False)
    assert int(sol.stats["num_steps"]) <= 4
    np.testing.assert_allclose(sol.value, b / np.diag(A), rtol=1e-12, atol=1e-14)
    assert np.all(np.isfinite(np.asarray(sol.value)))


@pytest.mark.parametrize("cls", SOLVERS, ids=lambda c: c.__name__)
def test_window_as_large_as_the_run_equals_full(cls):
    """A window at least as long as the run stores every vector: same iterates as
    `True`. A short window still solves a well-conditioned problem."""
    p = dense_problem(60, 20, cond=1e3)
    full = mfl.lstsq(p.A, p.b, _solver(cls, True, 60), throw=False)
    window = mfl.lstsq(p.A, p.b, _solver(cls, 1000, 60), throw=False)
    np.testing.assert_array_equal(full.value, window.value)
    assert int(full.stats["num_steps"]) == int(window.stats["num_steps"])
    p = dense_problem(60, 20, cond=10.0)
    short = mfl.lstsq(p.A, p.b, _solver(cls, 3, 200, atol=1e-12, btol=1e-12))
    assert _rel(short.value, reference_solution(p.A, p.b)) < 1e-10


@pytest.mark.parametrize("cls", SOLVERS, ids=lambda c: c.__name__)
def test_damped_complex_pytree(cls):
    """Damping, complex numbers and pytree structures go through the reorthogonalised
    iteration (inner products over all leaves, conjugated)."""
    p = dense_problem(50, 16, cond=1e5, complex=True, consistent=False)
    ref = reference_solution(p.A, p.b, damp=1e-3)
    sol = mfl.lstsq(p.A, p.b, _solver(cls, True, 100), damp=1e-3, throw=False)
    assert int(sol.stats["num_steps"]) <= 17
    assert _rel(sol.value, ref) < 1e-8

    q = dense_problem(30, 12, cond=1e6)
    wrap = pytree_operator(q.A)
    sol = mfl.lstsq(wrap.operator, wrap.vector(q.b), _solver(cls, True, 100))
    assert _rel(wrap.flat(sol.value), reference_solution(q.A, q.b)) < 1e-9


def test_float32_stops_on_machine_precision_tests():
    """float32 with tolerances below its precision: stops on the machine-precision
    tests (istop 4 or 5), not at max_steps, with an error at the float32 level."""
    p = dense_problem(120, 40, cond=1e3)
    A, b = p.A.astype(np.float32), p.b.astype(np.float32)
    ref = reference_solution(p.A, p.b)
    for cls in SOLVERS:
        sol = mfl.lstsq(A, b, _solver(cls, True, 400), throw=False)
        assert sol.value.dtype == jnp.float32
        assert int(sol.stats["istop"]) in (1, 2, 4, 5)
        assert int(sol.stats["num_steps"]) <= 41
        assert _rel(sol.value, ref) < 1e3 * 40 * np.finfo(np.float32).eps


def test_vmap_and_grad_through_reorthogonalised_solves():
    """Batched right-hand sides and derivatives use the same reorthogonalised solver."""
    p = dense_problem(40, 15, cond=1e4)
    solver = _solver(mfl.LSMR, True, 100)
    B = np.stack([p.b, 2 * p.b + p.A @ np.ones(15)])
    batched = jax.vmap(lambda b: mfl.lstsq(p.A, b, solver).value)(jnp.asarray(B))
    for i in range(2):
        np.testing.assert_allclose(
            batched[i], reference_solution(p.A, B[i]), rtol=1e-9, atol=0
        )

    def loss(A):
        x = mfl.lstsq(lx.MatrixLinearOperator(A), p.b, solver).value
        return jnp.sum(jnp.sin(x))

    def dense_loss(A):
        return jnp.sum(jnp.sin(jnp.linalg.solve(A.T @ A, A.T @ p.b)))

    got = jax.grad(loss)(jnp.asarray(p.A))
    want = jax.grad(dense_loss)(jnp.asarray(p.A))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8 * np.abs(want).max())


@pytest.mark.parametrize("bad", [-1, 1.5, "yes", None])
def test_bad_reorthogonalise(bad):
    for cls in SOLVERS:
        with pytest.raises(ValueError, match="reorthogonalise"):
            cls(reorthogonalise=bad)
