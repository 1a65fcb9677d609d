"""Golub–Kahan bidiagonalisation: the two relations, orthonormal bases, agreement with
a dense reference, pytree/complex operators, edge values of `num_steps`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    dense_problem,
    matrix_operator,
    pytree_function_operator,
    pytree_operator,
)
from jax.flatten_util import ravel_pytree

import matfree_lstsq as mfl


RTOL = 1e-10

# Compiled once per (operator type, shapes, num_steps): much cheaper than running the
# eager path op by op. `test_jit` checks that the eager path agrees.
_bidiag = eqx.filter_jit(mfl.bidiagonalise)


def _rows(tree) -> np.ndarray:
    """A basis pytree with leading axis k+1 as a (dimension × (k+1)) matrix."""
    return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(tree)).T


def _reference(A: np.ndarray, b: np.ndarray, k: int):
    """Dense Golub–Kahan with full reorthogonalisation (two Gram–Schmidt passes),
    written out in NumPy; no breakdown handling (use it for k < rank)."""
    m, n = A.shape
    Ah = A.conj().T
    U = np.zeros((m, k + 1), A.dtype)
    V = np.zeros((n, k + 1), A.dtype)
    alpha, beta = np.zeros(k + 1), np.zeros(k + 1)
    beta[0] = np.linalg.norm(b)
    U[:, 0] = b / beta[0]
    v = Ah @ U[:, 0]
    alpha[0] = np.linalg.norm(v)
    V[:, 0] = v / alpha[0]
    for i in range(1, k + 1):
        u = A @ V[:, i - 1] - alpha[i - 1] * U[:, i - 1]
        for _ in range(2):
            u = u - U[:, :i] @ (U[:, :i].conj().T @ u)
        beta[i] = np.linalg.norm(u)
        U[:, i] = u / beta[i]
        v = Ah @ U[:, i] - beta[i] * V[:, i - 1]
        for _ in range(2):
            v = v - V[:, :i] @ (V[:, :i].conj().T @ v)
        alpha[i] = np.linalg.norm(v)
        V[:, i] = v / alpha[i]
    return U, V, alpha, beta


def _check_relations(A: np.ndarray, b: np.ndarray, gk: mfl.GolubKahan, k: int):
    U, V = _rows(gk.left), _rows(gk.right)
    alpha, beta = np.asarray(gk.alpha), np.asarray(gk.beta)
    B = np.asarray(gk.bidiagonal())
    m, n = A.shape
    assert gk.num_steps == k
    assert U.shape == (m, k + 1)
    assert V.shape == (n, k + 1)
    assert alpha.shape == beta.shape == (k + 1,)
    assert B.shape == (k + 1, k)
    scale = np.linalg.norm(A, 2)

    # β₁u₁ = b
    assert beta[0] == pytest.approx(np.linalg.norm(b), rel=1e-14)
    assert np.linalg.norm(beta[0] * U[:, 0] - b) <= RTOL * np.linalg.norm(b)
    # A V_k = U_{k+1} B_k
    assert np.linalg.norm(A @ V[:, :k] - U @ B) <= RTOL * scale
    # Aᴴ U_{k+1} = V_k B_kᵀ + α_{k+1} v_{k+1} e_{k+1}ᵀ
    e = np.zeros(k + 1)
    e[k] = 1.0
    rhs = V[:, :k] @ B.T + alpha[k] * np.outer(V[:, k], e)
    assert np.linalg.norm(A.conj().T @ U - rhs) <= RTOL * scale
    return U, V


def _check_orthonormal(U: np.ndarray, V: np.ndarray, *, full: bool):
    """Non-zero columns orthonormal; the others (after termination) exactly zero."""
    for Q in (U, V):
        norms = np.linalg.norm(Q, axis=0)
        live = norms > 0.5
        np.testing.assert_array_equal(Q[:, ~live], 0.0)
        gram = Q.conj().T @ Q
        assert np.abs(gram - np.diag(live.astype(float))).max() <= RTOL
        if full:
            assert live.all()


# ---------------------------------------------------------------------------------
# The relations and orthonormality
# ---------------------------------------------------------------------------------

CASES = [
    # (name, shape, cond, complex, kind, k); k = min(m, n) is "full".
    ("tall-full", (30, 20), 1e3, False, "matrix", 20),
    ("wide", (20, 30), 1e3, False, "matrix", 10),
    ("square-full", (16, 16), 1e2, False, "matrix", 16),
    ("complex-tall-full", (24, 12), 1e2, True, "matrix", 12),
    ("complex-wide", (12, 24), 1e2, True, "matrix", 6),
    ("pytree-tall-full", (20, 12), 1e2, False, "pytree", 12),
    ("pytree-function-wide", (12, 20), 1e2, False, "pytree_function", 7),
    ("k=0", (10, 6), 10.0, False, "matrix", 0),
]
KINDS = {
    "matrix": matrix_operator,
    "pytree": pytree_operator,
    "pytree_function": pytree_function_operator,
}


@pytest.mark.parametrize(
    ("shape", "cond", "complex_", "kind", "k"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_relations_and_orthonormality(shape, cond, complex_, kind, k):
    m, n = shape
    # Inconsistent right-hand sides where possible, so that the left basis does not
    # run out before the right one on tall problems.
    p = dense_problem(m, n, cond=cond, seed=11, consistent=m <= n, complex=complex_)
    wrap = KINDS[kind](p.A)
    gk = _bidiag(wrap.operator, wrap.vector(p.b), k)

    # Structure of the result.
    real = jnp.float64
    assert gk.alpha.dtype == gk.beta.dtype == real
    out_leaves = jax.tree_util.tree_leaves(wrap.operator.out_structure())
    in_leaves = jax.tree_util.tree_leaves(wrap.operator.in_structure())
    for leaf, struct in zip(jax.tree_util.tree_leaves(gk.left), out_leaves):
        assert leaf.shape == (k + 1, *struct.shape)
        assert leaf.dtype == struct.dtype
    for leaf, struct in zip(jax.tree_util.tree_leaves(gk.right), in_leaves):
        assert leaf.shape == (k + 1, *struct.shape)
        assert leaf.dtype == struct.dtype

    U, V = _check_relations(p.A, p.b, gk, k)
    _check_orthonormal(U, V, full=k < min(m, n))
    alpha, beta = np.asarray(gk.alpha), np.asarray(gk.beta)
    assert np.all(alpha >= 0) and np.all(beta >= 0)
    if k < min(m, n):
        assert np.all(alpha > 0) and np.all(beta > 0)


def test_exhausted_space_terminates_with_exact_zeros():
    """k = min(m, n): the shorter basis runs out and what follows is exactly zero."""
    # Tall, inconsistent b: V is exhausted after n vectors, U has one more.
    p = dense_problem(20, 12, cond=100.0, seed=2, consistent=False)
    gk = _bidiag(p.A, p.b, 12)
    assert float(gk.alpha[12]) == 0.0
    np.testing.assert_array_equal(gk.right[12], 0.0)
    assert float(gk.beta[12]) > 1e-3
    assert np.linalg.norm(np.asarray(gk.left[12])) == pytest.approx(1.0)
    # Wide: U is exhausted after m vectors, and the next v is zero too.
    p = dense_problem(12, 20, cond=100.0, seed=2)
    gk = _bidiag(p.A, p.b, 12)
    assert float(gk.beta[12]) == 0.0
    assert float(gk.alpha[12]) == 0.0
    np.testing.assert_array_equal(gk.left[12], 0.0)
    np.testing.assert_array_equal(gk.right[12], 0.0)


def test_num_steps_zero():
    p = dense_problem(10, 6, seed=1)
    gk = _bidiag(p.A, p.b, 0)
    assert gk.num_steps == 0
    assert gk.left.shape == (1, 10)
    assert gk.right.shape == (1, 6)
    assert gk.bidiagonal().shape == (1, 0)
    u1 = p.b / np.linalg.norm(p.b)
    v1 = p.A.T @ u1
    np.testing.assert_allclose(gk.beta, [np.linalg.norm(p.b)], rtol=1e-14)
    np.testing.assert_allclose(gk.alpha, [np.linalg.norm(v1)], rtol=1e-14)
    np.testing.assert_allclose(gk.left[0], u1, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(gk.right[0], v1 / np.linalg.norm(v1), rtol=1e-13)


@pytest.mark.parametrize("bad", [-1, 7, 100, 2.0, True, None])
def test_num_steps_out_of_range_raises(bad):
    p = dense_problem(10, 6, seed=1)
    with pytest.raises(ValueError, match="num_steps"):
        mfl.bidiagonalise(p.A, jnp.asarray(p.b), bad)


def test_num_steps_bound_is_min_of_pytree_sizes():
    # min(m, n) counts all leaves: m = 12 (two leaves of 6), n = 8.
    wrap = pytree_function_operator(dense_problem(12, 8, seed=0).A)
    b = wrap.vector(np.ones(12))
    out = jax.eval_shape(lambda b: mfl.bidiagonalise(wrap.operator, b, 8), b)
    assert out.alpha.shape == (9,)
    with pytest.raises(ValueError, match="num_steps"):
        mfl.bidiagonalise(wrap.operator, b, 9)


# ---------------------------------------------------------------------------------
# Against a dense reference
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "complex_", "k"),
    [((20, 30), False, 10), ((12, 24), True, 6), ((16, 16), False, 15)],
    ids=["wide", "complex-wide", "square"],
)
def test_matches_dense_reference(shape, complex_, k):
    p = dense_problem(*shape, cond=30.0, seed=7, complex=complex_)
    gk = _bidiag(p.A, p.b, k)
    U, V, alpha, beta = _reference(p.A, p.b, k)
    np.testing.assert_allclose(gk.alpha, alpha, rtol=1e-10)
    np.testing.assert_allclose(gk.beta, beta, rtol=1e-10)
    np.testing.assert_allclose(_rows(gk.left), U, rtol=0, atol=1e-10)
    np.testing.assert_allclose(_rows(gk.right), V, rtol=0, atol=1e-10)
    # The bidiagonal matrix is assembled from exactly these coefficients.
    B = np.zeros((k + 1, k))
    B[np.arange(k), np.arange(k)] = alpha[:k]
    B[np.arange(1, k + 1), np.arange(k)] = beta[1:]
    np.testing.assert_allclose(gk.bidiagonal(), B, rtol=1e-10, atol=0)


def test_pytree_matches_dense_flattening():
    p = dense_problem(20, 12, cond=30.0, seed=4, consistent=False)
    wrap = pytree_operator(p.A)
    gk_tree = _bidiag(wrap.operator, wrap.vector(p.b), 12)
    gk_dense = _bidiag(p.A, p.b, 12)
    # Bases keep the operator's structures, with a leading axis.
    assert isinstance(gk_tree.left, tuple)
    assert isinstance(gk_tree.right, dict)
    np.testing.assert_allclose(gk_tree.alpha, gk_dense.alpha, rtol=1e-12)
    np.testing.assert_allclose(gk_tree.beta, gk_dense.beta, rtol=1e-12)
    np.testing.assert_allclose(_rows(gk_tree.left), gk_dense.left.T, atol=1e-12)
    np.testing.assert_allclose(_rows(gk_tree.right), gk_dense.right.T, atol=1e-12)


# ---------------------------------------------------------------------------------
# Reorthogonalisation, jit
# ---------------------------------------------------------------------------------


def test_reorthogonalisation_matters_on_ill_conditioned_problem():
    p = dense_problem(40, 30, cond=1e6, seed=0, consistent=False)
    k = 29
    with_ = _bidiag(p.A, p.b, k, reorthogonalise=True)
    without = _bidiag(p.A, p.b, k, reorthogonalise=False)
    # The three-term recurrences hold either way ...
    _check_relations(p.A, p.b, without, k)
    U, V = _check_relations(p.A, p.b, with_, k)
    # ... but only reorthogonalisation keeps the bases orthonormal.
    _check_orthonormal(U, V, full=True)
    U0, V0 = _rows(without.left), _rows(without.right)
    loss = max(
        np.abs(U0.T @ U0 - np.eye(k + 1)).max(), np.abs(V0.T @ V0 - np.eye(k + 1)).max()
    )
    assert loss > 1e-4


def test_jit():
    p = dense_problem(20, 30, cond=30.0, seed=4)
    A, b = jnp.asarray(p.A), jnp.asarray(p.b)
    jitted = jax.jit(lambda A, b: mfl.bidiagonalise(A, b, 10))(A, b)
    eager = mfl.bidiagonalise(A, b, 10)
    np.testing.assert_allclose(jitted.alpha, eager.alpha, rtol=1e-12)
    np.testing.assert_allclose(jitted.beta, eager.beta, rtol=1e-12)
    np.testing.assert_allclose(jitted.left, eager.left, atol=1e-12)
    np.testing.assert_allclose(jitted.right, eager.right, atol=1e-12)
    np.testing.assert_allclose(jitted.bidiagonal(), eager.bidiagonal(), atol=1e-12)
