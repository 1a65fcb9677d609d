"""The shared registry in `helpers.py` builds what it says it builds."""

import jax
import numpy as np
import pytest
from helpers import (
    OPERATOR_KINDS,
    classic_problem,
    dense_problem,
    lower_bidiagonal_matrix,
    reference_solution,
)
from jax.flatten_util import ravel_pytree


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("kind", OPERATOR_KINDS)
def test_operator_flattens_to_the_matrix(kind, complex_):
    A = dense_problem(5, 4, cond=10.0, seed=0, complex=complex_).A
    wrap = OPERATOR_KINDS[kind](A)

    @jax.jit
    @jax.vmap
    def column(e):
        return ravel_pytree(wrap.operator.mv(wrap.x(e)))[0]

    dense = np.asarray(column(np.eye(4, dtype=A.dtype))).T
    np.testing.assert_allclose(dense, A, rtol=0, atol=1e-14)
    # The converters round-trip.
    b = np.arange(5.0).astype(A.dtype)
    np.testing.assert_array_equal(wrap.flat(wrap.vector(b)), b)


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize(
    "m, n, rank", [(9, 5, None), (5, 9, None), (9, 5, 3), (6, 6, 2)]
)
def test_dense_problem(m, n, rank, complex_):
    cond = 1e3
    p = dense_problem(m, n, cond, rank, seed=1, consistent=True, complex=complex_)
    r = min(m, n) if rank is None else rank
    s = np.linalg.svd(p.A, compute_uv=False)
    np.testing.assert_allclose(s[:r], np.geomspace(1.0, 1.0 / cond, r), rtol=1e-10)
    assert np.all(s[r:] < 1e-14)  # exactly rank r, up to rounding
    assert p.A.dtype == (np.complex128 if complex_ else np.float64)
    np.testing.assert_allclose(p.b, p.A @ p.x_true)
    # Deterministic.
    q = dense_problem(m, n, cond, rank, seed=1, consistent=True, complex=complex_)
    np.testing.assert_array_equal(p.A, q.A)
    if r < m:
        p = dense_problem(m, n, cond, rank, seed=1, consistent=False, complex=complex_)
        g = p.b - p.A @ p.x_true
        Ab = p.A @ p.x_true
        np.testing.assert_allclose(np.linalg.norm(g), 0.1 * np.linalg.norm(Ab))
        assert np.linalg.norm(p.A.conj().T @ g) < 1e-14 * np.linalg.norm(g)
        # The minimum-norm least-squares solution ignores g.
        np.testing.assert_allclose(
            p.A @ reference_solution(p.A, p.b), Ab, rtol=1e-10, atol=1e-12
        )


def test_no_inconsistent_rhs_for_full_row_rank():
    with pytest.raises(ValueError):
        dense_problem(4, 6, consistent=False)


def test_classic_matrices():
    np.testing.assert_array_equal(
        lower_bidiagonal_matrix(4),
        [[1, 0, 0, 0], [1, 2, 0, 0], [0, 2, 3, 0], [0, 0, 3, 4]],
    )
    np.testing.assert_array_equal(
        lower_bidiagonal_matrix(4, 2), [[1, 0], [1, 2], [0, 2], [0, 0]]
    )
    p = classic_problem("identity", 3)
    np.testing.assert_array_equal(p.b, [3.0, 2.0, 1.0])
