"""What LSQR and LSMR share: hyperparameters, the lineax solver interface, the start
of the Golub–Kahan process, and the stopping tests."""

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._operator import (
    matvecs,
    scalar_dtypes,
    structure_size,
    tree_norm,
    tree_orthogonalise,
    tree_scale,
    tree_sub,
    tree_where,
    tree_zeros,
)
from ._solution import ISTOP_NONFINITE, istop_to_result


_INT32_MAX = int(np.iinfo(np.int32).max)
# Rows of a reorthogonalisation basis processed at a time.
_BASIS_BLOCK = 32


def _check_nonnegative(name: str, value: Any, strict: bool = False) -> None:
    if isinstance(value, Tracer):
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a real scalar; got {value!r}.") from None
    if np.isnan(v) or (v <= 0 if strict else v < 0):
        bound = "positive" if strict else "non-negative"
        raise ValueError(f"`{name}` must be {bound}; got {value!r}.")


class Problem(eqx.Module):
    """A least-squares problem as the iterations see it: `min ‖A d − r0‖² + λ²‖d‖²`
    with `x = x0 + d`."""

    mv: Callable = eqx.field(static=True)
    rmv: Callable = eqx.field(static=True)
    b: PyTree[Array]
    x0: PyTree[Array] | None
    damp: Float[Array, ""]
    in_structure: PyTree[jax.ShapeDtypeStruct] = eqx.field(static=True)


class Start(eqx.Module):
    """The first Golub–Kahan step: `β₁u₁ = b − A x0`, `α₁v₁ = Aᴴu₁`."""

    u: PyTree[Array]
    v: PyTree[Array]
    alpha: Float[Array, ""]
    beta: Float[Array, ""]
    norm_b: Float[Array, ""]
    finite: Bool[Array, ""]


def safe_divide(x: PyTree[Array], norm: Float[Array, ""]) -> PyTree[Array]:
    """`x / norm`, leaving `x` as it is where `norm == 0` (then `x` is zero anyway)."""
    return tree_scale(1 / jnp.where(norm > 0, norm, 1), x)


def start(problem: Problem, rdtype) -> Start:
    b = problem.b
    u = b if problem.x0 is None else tree_sub(b, problem.mv(problem.x0))
    norm_b = tree_norm(b).astype(rdtype)
    beta = tree_norm(u).astype(rdtype)
    u = safe_divide(u, beta)
    v = problem.rmv(u)
    alpha = tree_norm(v).astype(rdtype)
    v = safe_divide(v, alpha)
    # SciPy: when β₁ = 0 there is no Krylov space, v = 0 and α₁ = 0.
    v = tree_where(beta > 0, v, tree_zeros(problem.in_structure))
    alpha = jnp.where(beta > 0, alpha, 0)
    # A traced `damp` is checked here: negative or NaN is invalid input (istop -1).
    finite = jnp.isfinite(beta) & jnp.isfinite(alpha) & jnp.isfinite(problem.damp)
    finite = finite & (problem.damp >= 0)
    if problem.x0 is not None:
        finite = finite & jnp.isfinite(tree_norm(problem.x0))
    # With b = 0 but A x0 ≠ 0 SciPy's relative tests divide by zero; measure them
    # relative to ‖b − A x0‖ instead (the problem is then not trivial).
    norm_b = jnp.where(norm_b > 0, norm_b, beta)
    return Start(u, v, alpha, beta, norm_b, finite)


class Bases(eqx.Module):
    """The stored Golub–Kahan vectors that new ones are reorthogonalised against.

    Only the shorter side is kept: `right` holds the last `size` vectors `v_i` when
    m ≥ n (`left` is `None`), `left` the last `size` vectors `u_i` when m < n.
    Rows form a pytree with a leading axis of length `size`, filled cyclically (unfilled
    rows are zero); with `size` larger than the number of steps this is full
    reorthogonalisation.
    """

    left: PyTree[Array] | None
    right: PyTree[Array] | None
    count: Int[Array, ""]
    # Running maximum of the α and β seen so far (≈ ‖A‖): a new vector whose norm
    # after reorthogonalisation is below √min(m, n) ε times this is rounding noise.
    scale: Float[Array, ""]
    tol_factor: float = eqx.field(static=True)
    # Ring-buffer length, and the block size of the orthogonalisation.
    size: int = eqx.field(static=True)
    block: int = eqx.field(static=True)

    @classmethod
    def start(cls, s: "Start", size: int) -> "Bases":
        """Bases holding `u₁` and `v₁`, with room for `size` vectors each."""
        # Storage is a whole number of blocks; orthogonalisation visits only the
        # blocks filled so far, so early steps are cheap even when `size` is large.
        block = min(size, _BASIS_BLOCK)
        rows_alloc = -(-size // block) * block

        def rows(x):
            return jtu.tree_map(
                lambda xl: jnp.zeros((rows_alloc, *xl.shape), xl.dtype).at[0].set(xl),
                x,
            )

        m, n = structure_size(s.u), structure_size(s.v)
        factor = float(np.sqrt(min(m, n)) * np.finfo(s.alpha.dtype).eps)
        # One-sided: only the basis of the shorter side is stored and used (Simon and
        # Zha, 2000): keeping one basis orthogonal keeps the bidiagonal, and with it
        # the iterates, as accurate as two-sided reorthogonalisation does, at
        # min(m, n)/(m + n) of the memory and work.
        return cls(
            left=rows(s.u) if m < n else None,
            right=rows(s.v) if m >= n else None,
            count=jnp.ones((), jnp.int32),
            scale=jnp.maximum(s.alpha, s.beta),
            tol_factor=factor,
            size=size,
            block=block,
        )

    def orthogonalise(self, x: PyTree[Array], basis: PyTree[Array]) -> PyTree[Array]:
        return tree_orthogonalise(
            x, basis, num_rows=jnp.minimum(self.count, self.size), block=self.block
        )

    def push(
        self, u: PyTree[Array] | None, v: PyTree[Array] | None, alpha, beta
    ) -> "Bases":
        row = self.count % self.size

        def put(basis, x):
            if basis is None:
                return None
            return jtu.tree_map(lambda bl, xl: bl.at[row].set(xl), basis, x)

        return Bases(
            left=put(self.left, u),
            right=put(self.right, v),
            count=self.count + 1,
            scale=jnp.maximum(self.scale, jnp.maximum(alpha, beta)),
            tol_factor=self.tol_factor,
            size=self.size,
            block=self.block,
        )


def _normalise(x, rdtype, threshold=None):
    norm = tree_norm(x).astype(rdtype)
    if threshold is not None:
        # Breakdown: what is left after reorthogonalisation is rounding noise.
        norm = jnp.where(norm > threshold, norm, 0)
    return safe_divide(x, norm), norm


def bidiag_step(
    problem: Problem,
    u: PyTree[Array],
    v: PyTree[Array],
    alpha: Float[Array, ""],
    bases: Bases | None = None,
) -> tuple[
    PyTree[Array], PyTree[Array], Float[Array, ""], Float[Array, ""], Bases | None
]:
    """One Golub–Kahan step: `βu ← Av − αu`, `αv ← Aᴴu − βv`.

    As in SciPy, when `β = 0` the right vector and `α` are left as they were. With
    `bases`, each new vector is first reorthogonalised against the stored ones, and a
    coefficient at the level of rounding errors counts as zero.
    """
    rdtype = alpha.dtype
    threshold = None if bases is None else bases.tol_factor * bases.scale
    u = tree_sub(problem.mv(v), tree_scale(alpha, u))
    if bases is not None and bases.left is not None:
        u = bases.orthogonalise(u, bases.left)
    u, beta = _normalise(u, rdtype, threshold)
    v_new = tree_sub(problem.rmv(u), tree_scale(beta, v))
    if bases is not None and bases.right is not None:
        v_new = bases.orthogonalise(v_new, bases.right)
    v_new, alpha_new = _normalise(v_new, rdtype, threshold)
    v = tree_where(beta > 0, v_new, v)
    alpha = jnp.where(beta > 0, alpha_new, alpha)
    if bases is not None:
        # After a breakdown the vectors are not new directions: store zeros instead
        # (a repeated row would be subtracted twice by classical Gram–Schmidt).
        def keep(ok, x):
            return tree_where(ok, x, jtu.tree_map(jnp.zeros_like, x))

        bases = bases.push(
            None if bases.left is None else keep(beta > 0, u),
            None if bases.right is None else keep((beta > 0) & (alpha_new > 0), v_new),
            alpha,
            beta,
        )
    return u, v, alpha, beta, bases


def sym_ortho(
    a: Float[Array, ""], b: Float[Array, ""]
) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""]]:
    """Givens rotation `(c, s, r)`: `[c s; -s c] [a; b] = [r; 0]`, `r = hypot(a, b)`.

    With `r ≥ 0` this agrees with the SymOrtho convention of Paige and Saunders
    (`c = sign(a)` when `b = 0`, `s = sign(b)` when `a = 0`, all zero when both are).
    """
    # r = hypot(a, b), scaled by max(|a|, |b|) against overflow. Fewer operations
    # than jnp.hypot, whose inf/nan special cases the finiteness checks make moot.
    scale = jnp.maximum(jnp.abs(a), jnp.abs(b))
    safe = jnp.where(scale > 0, scale, 1)
    a_, b_ = a / safe, b / safe
    norm = jnp.sqrt(a_ * a_ + b_ * b_)
    safe_norm = jnp.where(norm > 0, norm, 1)
    return a_ / safe_norm, b_ / safe_norm, scale * norm


class AbstractLeastSquaresSolver(lx.AbstractLinearSolver):
    """Shared hyperparameters and lineax interface of [`matfree_lstsq.LSQR`][] and
    [`matfree_lstsq.LSMR`][]."""

    atol: eqx.AbstractVar[float]
    btol: eqx.AbstractVar[float]
    conlim: eqx.AbstractVar[float]
    max_steps: eqx.AbstractVar[int | None]
    full_rank: eqx.AbstractVar[bool]
    reorthogonalise: eqx.AbstractVar[bool | int]

    name: ClassVar[str]

    def __check_init__(self):
        _check_nonnegative("atol", self.atol)
        _check_nonnegative("btol", self.btol)
        _check_nonnegative("conlim", self.conlim, strict=True)
        if self.max_steps is not None:
            if not isinstance(self.max_steps, (int, np.integer)) or isinstance(
                self.max_steps, bool
            ):
                raise ValueError(
                    f"`max_steps` must be a non-negative int or None; got "
                    f"{self.max_steps!r}."
                )
            if self.max_steps < 0:
                raise ValueError(
                    f"`max_steps` must be non-negative; got {self.max_steps}."
                )
        r = self.reorthogonalise
        if not isinstance(r, (bool, int, np.integer)) or (
            not isinstance(r, bool) and r < 0
        ):
            raise ValueError(
                "`reorthogonalise` must be a bool (False: off, True: against all "
                "previous vectors) or a non-negative int (against that many most "
                f"recent vectors); got {r!r}."
            )

    @abc.abstractmethod
    def default_max_steps(self, m: int, n: int) -> int:
        """SciPy's default iteration limit for an `m × n` operator."""

    def resolved_max_steps(self, m: int, n: int) -> int:
        steps = (
            self.default_max_steps(m, n) if self.max_steps is None else self.max_steps
        )
        # The step counter is an int32 (also with x64 off): clamp rather than overflow.
        return min(int(steps), _INT32_MAX)

    def start_bases(self, s: Start, max_steps: int) -> Bases | None:
        """Storage for reorthogonalisation, or `None` when it is off."""
        r = self.reorthogonalise
        if r is False or r == 0:
            return None
        m, n = structure_size(s.u), structure_size(s.v)
        # The Krylov spaces have dimension at most min(m, n): a larger basis is waste.
        full = min(max_steps, min(m, n)) + 1
        size = full if r is True else min(int(r), full)
        return Bases.start(s, size)

    @abc.abstractmethod
    def iterate(
        self, problem: Problem, max_steps: int
    ) -> tuple[PyTree[Array], Int[Array, ""], dict[str, Array]]:
        """Run the iteration; return the solution, `istop` and the stats."""

    # ----- the lineax interface -------------------------------------------------

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        return lx.linearise(operator)

    def run(
        self, operator: lx.AbstractLinearOperator, vector: PyTree[Array]
    ) -> tuple[PyTree[Array], Int[Array, ""], dict[str, Array]]:
        """The undamped solve from zero: the Moore–Penrose solution `A⁺b`."""
        return solve(self, operator, vector, damp=None, x0=None)

    def compute(
        self,
        state: lx.AbstractLinearOperator,
        vector: PyTree[Array],
        options: dict[str, Any],
    ) -> tuple[PyTree[Array], lx.RESULTS, dict[str, Any]]:
        # lineax expects the Moore–Penrose solution A⁺b: no damping, no initial guess
        # (damping belongs in the operator, e.g. a stacked operator [A; λI]).
        del options
        x, istop, stats = self.run(state, vector)
        return x, istop_to_result(istop), stats

    def transpose(self, state: lx.AbstractLinearOperator, options: dict[str, Any]):
        return state.transpose(), options

    def conj(self, state: lx.AbstractLinearOperator, options: dict[str, Any]):
        return lx.conj(state), options

    def assume_full_rank(self) -> bool:
        return self.full_rank


def solve(
    solver: AbstractLeastSquaresSolver,
    operator: lx.AbstractLinearOperator,
    vector: PyTree[Array],
    *,
    damp: Float[Array, ""] | None,
    x0: PyTree[Array] | None,
) -> tuple[PyTree[Array], Int[Array, ""], dict[str, Array]]:
    """Build the problem and run `solver` on it."""
    in_struct = operator.in_structure()
    out_struct = operator.out_structure()
    _, rdtype = scalar_dtypes(in_struct, out_struct)
    mv, rmv = matvecs(operator)
    damp = jnp.zeros((), rdtype) if damp is None else jnp.asarray(damp, rdtype)
    m, n = structure_size(out_struct), structure_size(in_struct)
    problem = Problem(mv, rmv, vector, x0, damp, in_struct)
    x, istop, stats = solver.iterate(problem, solver.resolved_max_steps(m, n))
    return x, istop, stats


def initial_istop(s: Start, max_steps: int) -> tuple[Int[Array, ""], Bool[Array, ""]]:
    """`istop` and `done` before the first iteration.

    Stops at once when `Aᴴ(b − A x0) = 0` (then `x0` is a solution: istop 0), when an
    input is not finite, or when `max_steps = 0` (istop 7 unless already solved).
    """
    trivial = s.alpha * s.beta == 0
    istop = jnp.where(trivial | (max_steps > 0), 0, 7)
    istop = jnp.where(s.finite, istop, ISTOP_NONFINITE).astype(jnp.int32)
    done = trivial | (max_steps == 0) | ~s.finite
    return istop, done
