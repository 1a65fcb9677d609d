"""The solvers as lineax solvers (`lx.linear_solve`), inside optimistix, and the
`preconditioner` argument of `lstsq`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest
from helpers import (
    Wrapped,
    dense_problem,
    pytree_function_operator,
    reference_solution,
)

import matfree_lstsq as mfl


TIGHT = {
    "LSMR": mfl.LSMR(atol=1e-12, btol=1e-12, max_steps=100),
    "LSQR": mfl.LSQR(atol=1e-12, btol=1e-12, max_steps=100),
}
NAMES = ["LSMR", "LSQR"]

_linear_solve = eqx.filter_jit(lx.linear_solve)


def _rank_deficient(m: int, n: int, rank: int, seed: int):
    """`A = B C` of exact rank `rank` (never by zeroing entries) with a right-hand
    side that is not in its range."""
    return dense_problem(m, n, cond=10.0, rank=rank, seed=seed, consistent=False)


# ---------------------------------------------------------------------------------
# lineax
# ---------------------------------------------------------------------------------


def test_solvers_are_lineax_solvers():
    for solver in (mfl.LSMR(), mfl.LSQR(), *TIGHT.values()):
        assert isinstance(solver, lx.AbstractLinearSolver)
        assert isinstance(solver, mfl.AbstractLeastSquaresSolver)
        assert isinstance(solver, eqx.Module)
        # lineax must not assume an invertible operator (it is a least-squares solver).
        assert solver.assume_full_rank() is False


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(20, 8), (8, 20)], ids=["tall", "wide"])
def test_linear_solve_gives_pseudoinverse_solution(name, shape):
    p = _rank_deficient(*shape, rank=3, seed=1)
    A, b = jnp.asarray(p.A), jnp.asarray(p.b)
    assert np.linalg.matrix_rank(p.A) == 3
    sol = _linear_solve(lx.MatrixLinearOperator(A), b, solver=TIGHT[name])
    expected = jnp.linalg.pinv(A) @ b
    np.testing.assert_allclose(sol.value, expected, rtol=1e-8, atol=1e-10)
    assert bool(sol.result == lx.RESULTS.successful)
    assert int(sol.stats["istop"]) in (1, 2, 4, 5)
    # Not merely some least-squares solution: the minimum-norm one, with no
    # component in the (n − 3)-dimensional null space.
    null = np.linalg.svd(p.A)[2][3:].T
    assert np.linalg.norm(p.A @ null) < 1e-12
    x = np.asarray(sol.value)
    assert np.linalg.norm(null.T @ x) < 1e-9 * np.linalg.norm(x)


def test_linear_solve_pytree_operator():
    p = _rank_deficient(14, 10, rank=4, seed=2)
    wrap = pytree_function_operator(p.A)
    sol = _linear_solve(wrap.operator, wrap.vector(p.b), solver=TIGHT["LSQR"])
    assert isinstance(sol.value, dict)
    np.testing.assert_allclose(
        Wrapped.flat(sol.value), np.linalg.pinv(p.A) @ p.b, rtol=1e-8, atol=1e-10
    )


def test_linear_solve_reports_step_limit_without_throwing():
    p = dense_problem(20, 8, cond=10.0, seed=3, consistent=False)
    solver = mfl.LSMR(atol=1e-14, btol=1e-14, max_steps=2)
    sol = lx.linear_solve(
        lx.MatrixLinearOperator(jnp.asarray(p.A)),
        jnp.asarray(p.b),
        solver=solver,
        throw=False,
    )
    assert bool(sol.result == lx.RESULTS.max_steps_reached)
    assert int(sol.stats["num_steps"]) == 2
    with pytest.raises(eqx.EquinoxRuntimeError):
        jax.block_until_ready(
            lx.linear_solve(
                lx.MatrixLinearOperator(jnp.asarray(p.A)),
                jnp.asarray(p.b),
                solver=solver,
            ).value
        )


def test_linear_solve_damping_lives_in_operator():
    """lineax's contract: damping lives in the operator. A stacked [A; λI] operator
    solved by `lx.linear_solve` equals `lstsq` with `damp=λ`."""
    p = dense_problem(12, 9, cond=10.0, seed=4, consistent=False)
    lam = 0.7
    stacked = np.concatenate([p.A, lam * np.eye(9)])
    rhs = np.concatenate([p.b, np.zeros(9)])
    sol = _linear_solve(
        lx.MatrixLinearOperator(jnp.asarray(stacked)),
        jnp.asarray(rhs),
        solver=TIGHT["LSMR"],
    )
    direct = mfl.lstsq(jnp.asarray(p.A), jnp.asarray(p.b), TIGHT["LSMR"], damp=lam)
    np.testing.assert_allclose(sol.value, direct.value, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(
        sol.value, reference_solution(p.A, p.b, damp=lam), rtol=1e-9
    )


# ---------------------------------------------------------------------------------
# optimistix
# ---------------------------------------------------------------------------------

_T = np.linspace(0.0, 2.0, 25)
_TRUE = np.array([2.0, -1.3, 0.5])


def _residuals(params, args):
    t, y = args
    a, k, c = params[0], params[1], params[2]
    return a * jnp.exp(k * t) + c - y


# LSMR gets an explicit step limit: its default, SciPy's min(m, n) = 3 here, is
# exactly the number of steps that solve a 3-column system, and with tolerances of
# 1e-12 the stopping test usually registers one step later, so a Gauss–Newton step
# would end in `max_steps_reached` (as SciPy's lsmr does: istop 7 after 3 steps).
OPTX_SOLVERS = {
    "GaussNewton-LSMR": optx.GaussNewton(
        rtol=1e-10,
        atol=1e-10,
        linear_solver=mfl.LSMR(atol=1e-12, btol=1e-12, max_steps=20),
    ),
    "GaussNewton-LSQR": optx.GaussNewton(
        rtol=1e-10, atol=1e-10, linear_solver=mfl.LSQR(atol=1e-12, btol=1e-12)
    ),
    "LevenbergMarquardt-LSMR": optx.LevenbergMarquardt(
        rtol=1e-10,
        atol=1e-10,
        linear_solver=mfl.LSMR(atol=1e-12, btol=1e-12, max_steps=20),
    ),
}


@pytest.mark.parametrize("name", list(OPTX_SOLVERS))
def test_optimistix_least_squares(name):
    y = _TRUE[0] * np.exp(_TRUE[1] * _T) + _TRUE[2]  # noise-free: the fit is exact
    args = (jnp.asarray(_T), jnp.asarray(y))
    # Plain Gauss–Newton diverges from far away (with a dense QR solve too).
    y0 = jnp.array([1.5, -1.0, 0.3])
    sol = optx.least_squares(
        _residuals, OPTX_SOLVERS[name], y0, args=args, max_steps=100
    )
    assert bool(sol.result == optx.RESULTS.successful)
    np.testing.assert_allclose(sol.value, _TRUE, rtol=1e-7, atol=1e-8)
    # It really iterated (the linear solves were used, not skipped).
    assert int(sol.stats["num_steps"]) > 2


# ---------------------------------------------------------------------------------
# lstsq's preconditioner
# ---------------------------------------------------------------------------------


def _diag(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 3.0, n)


@pytest.mark.parametrize("name", NAMES)
def test_preconditioner_full_rank_same_solution(name):
    p = dense_problem(20, 8, cond=50.0, seed=5, consistent=False)
    A, b = jnp.asarray(p.A), jnp.asarray(p.b)
    d = _diag(0, 8)
    N = lx.DiagonalLinearOperator(jnp.asarray(d))
    # Without: here through lineax (same shapes as above, so no new compilation).
    plain = _linear_solve(lx.MatrixLinearOperator(A), b, solver=TIGHT[name])
    pre = mfl.lstsq(A, b, TIGHT[name], preconditioner=N)
    np.testing.assert_allclose(pre.value, plain.value, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(pre.value, np.linalg.pinv(p.A) @ p.b, rtol=1e-9)
    # norm_x reports ‖x‖ of the returned solution, not of the preconditioned y.
    assert float(pre.stats["norm_x"]) == pytest.approx(
        np.linalg.norm(np.asarray(pre.value)), rel=1e-10
    )


@pytest.mark.parametrize("name", NAMES)
def test_preconditioner_rank_deficient_minimises_weighted_norm(name):
    """With A rank-deficient and N = diag(d), lstsq returns
    x = N (A N)⁺ b: the least-squares solution of least ‖N⁻¹x‖, not of least ‖x‖."""
    p = _rank_deficient(20, 8, rank=3, seed=6)
    d = _diag(1, 8)
    N = lx.DiagonalLinearOperator(jnp.asarray(d))
    sol = mfl.lstsq(jnp.asarray(p.A), jnp.asarray(p.b), TIGHT[name], preconditioner=N)
    x = np.asarray(sol.value)

    expected = d * (np.linalg.pinv(p.A * d) @ p.b)
    np.testing.assert_allclose(x, expected, rtol=1e-8, atol=1e-10)
    # It is a least-squares solution (normal equations) ...
    assert np.linalg.norm(p.A.T @ (p.A @ x - p.b)) < 1e-9 * np.linalg.norm(p.b)
    # ... but not the minimum-norm one, which has the larger weighted norm.
    x_pinv = np.linalg.pinv(p.A) @ p.b
    assert np.linalg.norm(x - x_pinv) > 1e-3 * np.linalg.norm(x_pinv)
    assert np.linalg.norm(x / d) < np.linalg.norm(x_pinv / d)
    assert np.linalg.norm(x_pinv) < np.linalg.norm(x)
    # Minimality against random least-squares solutions x + null-space vectors.
    null = np.linalg.svd(p.A)[2][3:].T  # orthonormal basis of the null space
    rng = np.random.default_rng(0)
    for _ in range(20):
        other = x + null @ rng.standard_normal(null.shape[1])
        assert np.linalg.norm(x / d) <= np.linalg.norm(other / d)


@pytest.mark.parametrize(
    ("name", "damped"), [("LSMR", False), ("LSQR", False), ("LSMR", True)]
)
def test_preconditioner_with_x0_and_damp(name, damped):
    p = _rank_deficient(20, 8, rank=3, seed=6)
    d = _diag(1, 8)
    N = lx.DiagonalLinearOperator(jnp.asarray(d))
    x0 = np.linspace(-1.0, 1.0, 8)
    A, b = jnp.asarray(p.A), jnp.asarray(p.b)
    AN = p.A * d

    if not damped:
        # x = x0 + N (A N)⁺ (b − A x0): least ‖N⁻¹(x − x0)‖ among LS solutions.
        sol = mfl.lstsq(A, b, TIGHT[name], preconditioner=N, x0=jnp.asarray(x0))
        expected = x0 + d * (np.linalg.pinv(AN) @ (p.b - p.A @ x0))
        np.testing.assert_allclose(sol.value, expected, rtol=1e-8, atol=1e-10)
        plain = reference_solution(p.A, p.b, x0=x0)
    else:
        # min ‖A N y − (b − A x0)‖² + λ²‖y‖², x = x0 + N y.
        lam = 0.3
        sol = mfl.lstsq(
            A, b, TIGHT[name], preconditioner=N, x0=jnp.asarray(x0), damp=lam
        )
        y = np.linalg.solve(AN.T @ AN + lam**2 * np.eye(8), AN.T @ (p.b - p.A @ x0))
        np.testing.assert_allclose(sol.value, x0 + d * y, rtol=1e-8, atol=1e-10)
        plain = reference_solution(p.A, p.b, damp=lam, x0=x0)
    # Either way, not the unpreconditioned solution.
    assert np.linalg.norm(np.asarray(sol.value) - plain) > 1e-3


def test_preconditioner_function_operator():
    """Any lineax operator works as N, e.g. a (non-diagonal) function operator."""
    p = _rank_deficient(20, 8, rank=3, seed=6)
    rng = np.random.default_rng(3)
    M = np.eye(8) + 0.3 * rng.standard_normal((8, 8))  # invertible
    M_ = jnp.asarray(M)
    N = lx.FunctionLinearOperator(
        lambda y: M_ @ y, jax.ShapeDtypeStruct((8,), M_.dtype)
    )
    sol = mfl.lstsq(jnp.asarray(p.A), jnp.asarray(p.b), TIGHT["LSMR"], preconditioner=N)
    expected = M @ (np.linalg.pinv(p.A @ M) @ p.b)
    np.testing.assert_allclose(sol.value, expected, rtol=1e-8, atol=1e-10)
