"""Shared test registry: seeded dense problems, SciPy's classic test matrices, lineax
operators of several kinds wrapping the same dense matrix, and a SciPy reference.

Everything here is plain float64/complex128 numpy until it is handed to an operator.
Import it from any test file as `from helpers import ...` (pytest puts `tests/` on the
path because the directory has no `__init__.py`).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import scipy.sparse.linalg as spla
from jax.flatten_util import ravel_pytree

import matfree_lstsq as mfl


STAT_KEYS = ("norm_r", "norm_Ar", "norm_A", "cond_A", "norm_x")


# ---------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """A dense least-squares problem `min ‖A x − b‖`.

    `basis` is an orthonormal basis of range(A) (m × rank); `x_true` is the vector the
    right-hand side was built from (`b = A x_true` when `consistent`).
    """

    A: np.ndarray
    b: np.ndarray
    x_true: np.ndarray
    rank: int
    consistent: bool
    basis: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.A.shape


def _gaussian(rng: np.random.Generator, shape, complex_: bool) -> np.ndarray:
    if complex_:
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(
            2
        )
    return rng.standard_normal(shape)


def orthogonal_to(basis: np.ndarray, g: np.ndarray) -> np.ndarray:
    """`g` with its components along the orthonormal columns of `basis` removed
    (two passes of Gram–Schmidt, so the result is orthogonal to working precision)."""
    for _ in range(2):
        g = g - basis @ (basis.conj().T @ g)
    return g


def dense_problem(
    m: int,
    n: int,
    cond: float = 10.0,
    rank: int | None = None,
    *,
    seed: int = 0,
    consistent: bool = True,
    complex: bool = False,
) -> Problem:
    """`A = B C` with `B = U diag(s)` (m × r) and `C = Vᴴ` (r × n).

    `U`, `V` have orthonormal columns (QR of seeded Gaussian matrices) and `s` is
    geometric from 1 down to `1/cond`. With `rank=None`, `r = min(m, n)` and this is
    the full-rank `A = U diag(s) Vᴴ`; a smaller `rank` gives an exactly rank-`r`
    product (never made by zeroing entries). `b = A x_true` with `x_true ~ N(0, I)`;
    an inconsistent `b` adds a component orthogonal to range(A) of norm
    `0.1 ‖A x_true‖`.
    """
    r = min(m, n) if rank is None else rank
    if not 1 <= r <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}]; got {rank}")
    if not consistent and r == m:
        raise ValueError("range(A) is all of C^m: no inconsistent right-hand side")
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(_gaussian(rng, (m, r), complex))
    V, _ = np.linalg.qr(_gaussian(rng, (n, r), complex))
    s = np.geomspace(1.0, 1.0 / cond, r)
    B, C = U * s, V.conj().T
    A = B @ C
    x_true = _gaussian(rng, (n,), complex)
    b = A @ x_true
    if not consistent:
        g = orthogonal_to(U, _gaussian(rng, (m,), complex))
        b = b + g * (0.1 * np.linalg.norm(b) / np.linalg.norm(g))
    return Problem(A, b, x_true, r, consistent, U)


def identity_matrix(n: int) -> np.ndarray:
    return np.eye(n)


def lower_bidiagonal_matrix(m: int, n: int | None = None) -> np.ndarray:
    """The leading m × n block of the infinite lower-bidiagonal matrix with diagonal
    1, 2, 3, ... and subdiagonal 1, 2, 3, ...: entries `(i, i) = i + 1` and
    `(i + 1, i) = i + 1` (0-based). For m = n: diagonal 1..n, subdiagonal 1..n-1.
    Its singular values lie in about [0.6, 2n): a mildly ill-conditioned, well
    scaled Krylov test matrix."""
    n = m if n is None else n
    A = np.zeros((m, n))
    for i in range(min(m, n)):
        A[i, i] = i + 1
        if i + 1 < m:
            A[i + 1, i] = i + 1
    return A


def classic_problem(name: str, n: int, x_true: np.ndarray | None = None) -> Problem:
    """SciPy's test problems: `A` identity or lower bidiagonal (n × n), with
    `b = A x_true` and by default `x_true = (n, n − 1, ..., 1)`."""
    A = {"identity": identity_matrix, "lower_bidiagonal": lower_bidiagonal_matrix}[
        name
    ](n)
    if x_true is None:
        x_true = np.arange(n, 0, -1, dtype=np.float64)
    return Problem(A, A @ x_true, x_true, n, True, np.eye(n))


def reference_solution(
    A: np.ndarray, b: np.ndarray, damp: float = 0.0, x0: np.ndarray | None = None
) -> np.ndarray:
    """Dense oracle: `argmin ‖A x − b‖² + λ²‖x − x0‖²`, the one closest to `x0` when
    λ = 0 (i.e. `x0 + A⁺(b − A x0)`)."""
    n = A.shape[1]
    x0 = np.zeros(n, A.dtype) if x0 is None else x0
    r0 = b - A @ x0
    if damp == 0:
        return x0 + np.linalg.pinv(A) @ r0
    stacked = np.concatenate([A, damp * np.eye(n, dtype=A.dtype)])
    rhs = np.concatenate([r0, np.zeros(n, A.dtype)])
    return x0 + np.linalg.lstsq(stacked, rhs, rcond=None)[0]


# ---------------------------------------------------------------------------------
# Operators. Each wrapper turns a dense `A` into a lineax operator whose dense
# flattening (inputs and outputs raveled in `jax.flatten_util.ravel_pytree` order)
# is `A`, together with converters between flat numpy vectors and its pytrees.
# ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Wrapped:
    operator: lx.AbstractLinearOperator
    _unravel_in: Callable[[jax.Array], Any]
    _unravel_out: Callable[[jax.Array], Any]

    def vector(self, b: np.ndarray) -> Any:
        """A flat right-hand side as a pytree of the operator's output structure."""
        return self._unravel_out(jnp.asarray(b))

    def x(self, x: np.ndarray) -> Any:
        """A flat vector as a pytree of the operator's input structure."""
        return self._unravel_in(jnp.asarray(x))

    @staticmethod
    def flat(tree: Any) -> np.ndarray:
        """Ravel a pytree (of either structure) to a flat numpy vector."""
        return np.asarray(ravel_pytree(tree)[0])


def _wrap(operator: lx.AbstractLinearOperator) -> Wrapped:
    def unraveller(struct):
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), struct)
        return ravel_pytree(zeros)[1]

    return Wrapped(
        operator,
        unraveller(operator.in_structure()),
        unraveller(operator.out_structure()),
    )


def matrix_operator(A: np.ndarray) -> Wrapped:
    return _wrap(lx.MatrixLinearOperator(jnp.asarray(A)))


def function_operator(A: np.ndarray) -> Wrapped:
    A_ = jnp.asarray(A)
    in_struct = jax.ShapeDtypeStruct((A.shape[1],), A_.dtype)
    return _wrap(lx.FunctionLinearOperator(lambda x: A_ @ x, in_struct))


def jacobian_operator(A: np.ndarray) -> Wrapped:
    """The Jacobian (at an arbitrary point) of the linear map `x ↦ A x`."""
    x = jnp.asarray(np.linspace(-1.0, 1.0, A.shape[1]).astype(A.dtype))
    return _wrap(lx.JacobianLinearOperator(lambda x, A_: A_ @ x, x, jnp.asarray(A)))


def _pytree_split(A: np.ndarray) -> tuple[int, int]:
    m, n = A.shape
    if m < 2 or n < 2:
        raise ValueError("pytree operators need m, n >= 2")
    return m // 2, n // 2


def _pytree_structures(A: np.ndarray):
    """Input `{"a": (n1,), "b": (n − n1, 1)}`, output `((m1,), (m − m1, 1))`."""
    (m, n), (m1, n1) = A.shape, _pytree_split(A)
    S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.dtype(A.dtype))
    return {"a": S(n1), "b": S(n - n1, 1)}, (S(m1), S(m - m1, 1))


def pytree_function_operator(A: np.ndarray) -> Wrapped:
    """A function operator from a dict to a tuple, flattening to `A`."""
    (m1, _), A_ = _pytree_split(A), jnp.asarray(A)
    in_struct, _ = _pytree_structures(A)

    def fn(x):
        y = A_ @ jnp.concatenate([x["a"], x["b"].reshape(-1)])
        return y[:m1], y[m1:].reshape(-1, 1)

    return _wrap(lx.FunctionLinearOperator(fn, in_struct))


def pytree_operator(A: np.ndarray) -> Wrapped:
    """`lx.PyTreeLinearOperator` from a dict to a tuple: the block `(i, j)` has shape
    `out_leaf_i.shape + in_leaf_j.shape`."""
    m, (m1, n1) = A.shape[0], _pytree_split(A)
    in_struct, out_struct = _pytree_structures(A)
    rows = (slice(0, m1), slice(m1, m))
    blocks = tuple(
        {
            "a": A[r, :n1].reshape(o.shape + in_struct["a"].shape),
            "b": A[r, n1:].reshape(o.shape + in_struct["b"].shape),
        }
        for r, o in zip(rows, out_struct)
    )
    blocks = jax.tree_util.tree_map(jnp.asarray, blocks)
    return _wrap(lx.PyTreeLinearOperator(blocks, out_struct))


def composed_operator(A: np.ndarray, seed: int = 1) -> Wrapped:
    """`op1 @ op2` with `op2 = Q` (a seeded n × n unitary) and `op1 = A Qᴴ` (a
    function operator), so the product is `A` up to rounding."""
    n = A.shape[1]
    Q, _ = np.linalg.qr(_gaussian(np.random.default_rng(seed), (n, n), False))
    Q = Q.astype(A.dtype)
    AQh = jnp.asarray(A @ Q.conj().T)
    op1 = lx.FunctionLinearOperator(
        lambda x: AQh @ x, jax.ShapeDtypeStruct((n,), AQh.dtype)
    )
    return _wrap(op1 @ lx.MatrixLinearOperator(jnp.asarray(Q)))


OPERATOR_KINDS: dict[str, Callable[[np.ndarray], Wrapped]] = {
    "matrix": matrix_operator,
    "function": function_operator,
    "jacobian": jacobian_operator,
    "pytree_function": pytree_function_operator,
    "pytree": pytree_operator,
    "composed": composed_operator,
}


# ---------------------------------------------------------------------------------
# SciPy reference
# ---------------------------------------------------------------------------------


def scipy_lstsq(
    solver: mfl.LSMR | mfl.LSQR,
    A: np.ndarray,
    b: np.ndarray,
    *,
    damp: float = 0.0,
    x0: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Run SciPy's `lsmr`/`lsqr` with the solver's settings; return `x` and the stats
    under this package's names (LSQR: `norm_r` is SciPy's `r2norm`, `norm_x` is the
    norm of the returned `x`, not SciPy's estimate of ‖x − x0‖)."""
    kw = dict(damp=damp, atol=solver.atol, btol=solver.btol, conlim=solver.conlim)
    if isinstance(solver, mfl.LSMR):
        x, istop, itn, normr, normar, norma, conda, normx = spla.lsmr(
            A, b, maxiter=solver.max_steps, x0=x0, **kw
        )
    elif isinstance(solver, mfl.LSQR):
        x, istop, itn, _, normr, norma, conda, normar, _, _ = spla.lsqr(
            A, b, iter_lim=solver.max_steps, x0=x0, **kw
        )
        normx = np.linalg.norm(x)
    else:
        raise TypeError(type(solver))
    stats = dict(
        num_steps=itn,
        istop=istop,
        norm_r=normr,
        norm_Ar=normar,
        norm_A=norma,
        cond_A=conda,
        norm_x=normx,
    )
    return np.asarray(x), {k: float(v) for k, v in stats.items()}
