"""Property: a reported convergence is real.

Whenever LSMR or LSQR stops with istop ∈ {1, 2, 4, 5}, the returned x satisfies the
stopping inequality that code stands for, recomputed from scratch with dense NumPy
(r̄ = [b − A x; −λ x], Ā = [A; λI]):

- 1: ‖r̄‖ ≤ btol‖b‖ + atol·N·‖x‖                (compatible system)
- 2: ‖Āᴴr̄‖ ≤ atol·N·‖r̄‖                         (least squares)
- 4: ‖r̄‖ ≤ (eps/2)(‖b‖ + N‖x‖)                  (1 + t1 ≤ 1)
- 5: ‖Āᴴr̄‖ ≤ (eps/2)·N·‖r̄‖                      (1 + test2 ≤ 1)

Which norm of A? The solver tests with its estimate Â = ‖B_k‖_F of the bidiagonal
(`norm_A`), not with a norm of A. Â is *not* bounded by ‖A‖₂ (it is a Frobenius-type
sum), so the spectral norm would make the recomputed test stricter than the solver's
and is not rigorous. In exact arithmetic B_k = U_{k+1}ᴴ Ā V_k with orthonormal U, V,
so Â ≤ ‖Ā‖_F; in floating point, once orthogonality is lost, Â keeps growing and may
exceed ‖Ā‖_F. So we use N = max(Â, ‖Ā‖_F), which is never below what the solver used,
and guard separately against a nonsensical Â (each α, β is at most ‖Ā‖₂, so
Â ≤ √(2k+1)·‖Ā‖₂; we allow a factor 2 for rounding) so that a huge estimate cannot
hide a wrong x.

Slack. In exact arithmetic the solver's ‖r̄‖, ‖Āᴴr̄‖ and ‖x‖ estimates are exact, so
no multiplicative factor is allowed. What remains is rounding: the recurrences drift
from the true residual by O(eps) per step relative to ‖b‖ + ‖A‖‖x‖ (the residual
gap of updated Krylov iterates) and evaluating b − A x densely costs O((m + n) eps)
of the same scale. Hence the additive floor `τ (‖b‖ + N‖x‖)` with τ = (k + m + n)·eps
on ‖r̄‖, and N times that on ‖Āᴴr̄‖. With x = 0 the test of code 1 reads
‖b‖ ≤ (btol + τ)‖b‖ and fails; `test_margin_rejects_wrong_solutions` checks that for
the solver's problems directly, together with a perturbed x.
"""

import numpy as np
import pytest
from helpers import dense_problem
from hypothesis import event, given, strategies as st

import matfree_lstsq as mfl


EPS = np.finfo(np.float64).eps
SOLVERS = {"LSMR": mfl.LSMR, "LSQR": mfl.LSQR}
CHECKED_CODES = (1, 2, 4, 5)


def stopping_margin(A, b, x, stats, solver, damp: float) -> float:
    """`lhs / rhs` of the inequality behind `stats["istop"]` (one of 1, 2, 4, 5):
    at most 1 when x satisfies it."""
    m, n = A.shape
    istop, k = int(stats["istop"]), int(stats["num_steps"])
    A_bar = np.concatenate([A, damp * np.eye(n, dtype=A.dtype)])
    r_bar = np.concatenate([b, np.zeros(n, b.dtype)]) - A_bar @ x
    norm_r = np.linalg.norm(r_bar)
    norm_Ar = np.linalg.norm(A_bar.conj().T @ r_bar)
    norm_b, norm_x = np.linalg.norm(b), np.linalg.norm(x)

    norm_A_est = float(stats["norm_A"])
    norm_A_2 = np.linalg.norm(A_bar, 2)
    assert norm_A_est <= 2 * np.sqrt(2 * k + 1) * norm_A_2, "nonsensical norm_A"
    N = max(norm_A_est, np.linalg.norm(A_bar))

    tau = (k + m + n) * EPS
    floor_r = tau * (norm_b + N * norm_x)
    floor_Ar = N * floor_r
    # LSQR's test2 is ‖Āᴴr̄‖ / (Â‖r̄‖ + eps): one more (negligible) absolute term.
    extra = EPS if isinstance(solver, mfl.LSQR) else 0.0

    if istop == 1:
        return norm_r / (solver.btol * norm_b + solver.atol * N * norm_x + floor_r)
    if istop == 2:
        return norm_Ar / (solver.atol * (N * norm_r + extra) + floor_Ar)
    if istop == 4:
        return norm_r / (EPS / 2 * (norm_b + N * norm_x) + floor_r)
    if istop == 5:
        return norm_Ar / (EPS / 2 * (N * norm_r + extra) + floor_Ar)
    raise ValueError(f"no inequality for istop {istop}")


def run(solver, problem, damp):
    sol = mfl.lstsq(problem.A, problem.b, solver, damp=damp, throw=False)
    return np.asarray(sol.value), {k: float(v) for k, v in sol.stats.items()}


TOLERANCES = st.sampled_from([0.0, 1e-12, 1e-8, 1e-6, 1e-3])


@st.composite
def cases(draw):
    m = draw(st.integers(1, 12), label="m")
    n = draw(st.integers(1, 12), label="n")
    rank = draw(st.integers(1, min(m, n)), label="rank")
    cond = 10.0 ** draw(st.integers(0, 8), label="log10 cond")
    consistent = rank == m or draw(st.booleans(), label="consistent")
    problem = dense_problem(
        m,
        n,
        cond,
        rank,
        seed=draw(st.integers(0, 2**32 - 1), label="seed"),
        consistent=consistent,
        complex=draw(st.booleans(), label="complex"),
    )
    solver = SOLVERS[draw(st.sampled_from(sorted(SOLVERS)), label="solver")](
        atol=draw(TOLERANCES, label="atol"),
        btol=draw(TOLERANCES, label="btol"),
        max_steps=draw(st.sampled_from([None, 4 * max(m, n)]), label="max_steps"),
    )
    damp = draw(st.sampled_from([0.0, 0.0, 1e-3, 0.3]), label="damp")
    return problem, solver, damp


@given(cases())
def test_reported_convergence_satisfies_stopping_rule(case):
    problem, solver, damp = case
    x, stats = run(solver, problem, damp)
    istop = int(stats["istop"])
    event(f"istop={istop}")
    if istop not in CHECKED_CODES:
        return
    assert np.all(np.isfinite(x))
    assert stopping_margin(problem.A, problem.b, x, stats, solver, damp) <= 1.0


# ---------------------------------------------------------------------------------
# The check itself must have teeth: for one problem per code, the solver's x passes
# and x = 0 or a perturbed x fails.
# ---------------------------------------------------------------------------------

TIGHT = {"atol": 1e-8, "btol": 1e-8}
EXACT = {"atol": 0.0, "btol": 0.0, "max_steps": 50}
# code: (consistent, solver settings); 12 × 7, cond 10 (or 1.2 to reach eps quickly).
TEETH_CASES = {1: (True, TIGHT), 2: (False, TIGHT), 4: (True, EXACT), 5: (False, EXACT)}


@pytest.mark.parametrize("solver_name", SOLVERS)
@pytest.mark.parametrize("code", TEETH_CASES)
def test_margin_rejects_wrong_solutions(code, solver_name):
    consistent, settings = TEETH_CASES[code]
    cond = 10.0 if settings is TIGHT else 1.2
    problem = dense_problem(12, 7, cond, seed=code, consistent=consistent)
    solver = SOLVERS[solver_name](**settings)
    x, stats = run(solver, problem, 0.0)
    assert stats["istop"] == code

    def margin(y):
        return stopping_margin(problem.A, problem.b, y, stats, solver, 0.0)

    assert margin(x) <= 1.0
    assert margin(np.zeros_like(x)) > 1e2
    direction = np.random.default_rng(0).standard_normal(x.shape)
    perturbed = x + 1e-4 * np.linalg.norm(x) * direction / np.linalg.norm(direction)
    assert margin(perturbed) > 10.0
