"""`lstsq`: the differentiable entry point, and its derivative rules.

The solution map $(A, b, \\lambda, x_0) \\mapsto x$ gets a custom JVP whose tangent is
assembled from *linear* solves, `lineax.linear_solve` with this package's solver. Those
are transposable (the transpose of a solve with $A$ is a solve with $A^\\mathsf{T}$), so
JAX derives reverse mode, and every composition of modes, by linearising and
transposing this one rule: a VJP costs as many solves as a JVP.
"""

from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, ArrayLike, Float, PyTree

from ._lsmr import LSMR
from ._operator import (
    as_operator,
    check_structure,
    is_complex,
    matvecs,
    same_structure,
    scalar_dtypes,
    structure_size,
    tree_add,
    tree_norm,
    tree_scale,
    tree_sub,
    tree_zeros,
)
from ._solution import (
    RESULTS,
    Solution,
    error_messages,
    failed,
    istop_to_result,
    message_index,
)
from ._solver import AbstractLeastSquaresSolver, solve


def _check_damp(damp: Any, rdtype) -> Array:
    if isinstance(damp, Tracer):
        if jnp.shape(damp) != () or jnp.iscomplexobj(damp):
            raise ValueError(f"`damp` must be a real scalar; got {damp!r}.")
        return jnp.asarray(damp).astype(rdtype)
    # A concrete value: check it with NumPy (jnp would stage it inside a trace).
    arr = np.asarray(damp)
    if arr.shape != () or not np.isrealobj(arr):
        raise ValueError(
            f"`damp` must be a real scalar; got an array of shape {arr.shape} and "
            f"dtype {arr.dtype}."
        )
    if arr < 0:
        raise ValueError(f"`damp` must be non-negative; got {damp!r}.")
    return jnp.asarray(damp, rdtype)


# ---------------------------------------------------------------------------------
# Derivative solves.
# ---------------------------------------------------------------------------------


class _DerivativeSolver(lx.AbstractLinearSolver):
    """The forward solver, reused for the solves inside a derivative.

    lineax's transpose rule always asks for `throw=True`; this wrapper decides instead:
    it reports success to lineax, and raises its own message (naming the derivative
    solve) only when the user passed `throw=True` to `lstsq`.
    """

    solver: AbstractLeastSquaresSolver
    throw: bool

    def init(self, operator, options):
        return self.solver.init(operator, options)

    def compute(self, state, vector, options):
        x, istop, stats = self.solver.run(state, vector)
        if self.throw:
            x = eqx.branched_error_if(
                x,
                failed(istop),
                message_index(istop),
                error_messages(
                    self.solver.name, "in a solve for the derivative of `lstsq`"
                ),
            )
        return x, RESULTS.successful, stats

    def transpose(self, state, options):
        return self.solver.transpose(state, options)

    def conj(self, state, options):
        return self.solver.conj(state, options)

    def assume_full_rank(self):
        return self.solver.assume_full_rank()


def _linear_solve(operator, vector, solver, throw):
    solver = _DerivativeSolver(solver, throw)
    return lx.linear_solve(operator, vector, solver, throw=False).value


def _is_none(x):
    return x is None


def _any(tree) -> bool:
    return any(t is not None for t in jtu.tree_leaves(tree, is_leaf=_is_none))


def _materialise(tangent, primal):
    """Replace symbolic-zero (`None`) tangents of inexact array leaves by zeros."""

    def fill(t, p):
        if t is None and eqx.is_inexact_array(p):
            return jnp.zeros_like(p)
        return t

    return jtu.tree_map(fill, tangent, primal, is_leaf=_is_none)


def _sum(*terms):
    """Sum of the pytrees in `terms` that are not `None` (or `None`)."""
    terms = [t for t in terms if t is not None]
    if not terms:
        return None
    out = terms[0]
    for t in terms[1:]:
        out = tree_add(out, t)
    return out


def _neg(x):
    return None if x is None else tree_scale(-1, x)


# ---------------------------------------------------------------------------------
# The custom JVP.
# ---------------------------------------------------------------------------------


@eqx.filter_custom_jvp
def _solution(operator, vector, damp, x0, *, solver, damped, throw):
    del damped, throw
    return solve(solver, operator, vector, damp=damp, x0=x0)


@_solution.def_jvp
def _solution_jvp(primals, tangents, *, solver, damped, throw):
    operator, b, damp, x0 = primals
    t_operator, t_b, t_damp, t_x0 = tangents
    out = _solution(operator, b, damp, x0, solver=solver, damped=damped, throw=throw)
    x, _, stats = out
    no_stats = jtu.tree_map(lambda _: None, stats)
    if not (_any(t_operator) or _any(t_b) or _any(t_damp) or _any(t_x0)):
        return out, (None, None, no_stats)
    in_struct, out_struct = operator.in_structure(), operator.out_structure()
    if is_complex(in_struct) or is_complex(out_struct):
        raise NotImplementedError(
            "Derivatives of `matfree_lstsq.lstsq` with complex operators or vectors "
            "are not supported yet; only the forward solve is. Differentiate a real "
            "formulation (stack real and imaginary parts) instead."
        )
    rules = _Rules(operator, b, damp, x0, x, stats, solver, throw)
    t_operator = _materialise(t_operator, operator) if _any(t_operator) else None
    t_b = t_b if _any(t_b) else None
    t_damp = t_damp if _any(t_damp) else None
    t_x0 = t_x0 if (_any(t_x0) and x0 is not None) else None
    if t_x0 is not None:
        t_x0 = _materialise(t_x0, x0)
    if t_b is not None:
        t_b = _materialise(t_b, b)
    if damped is True:
        t_x = rules.damped(t_operator, t_b, t_damp, t_x0)
    elif damped is False:
        t_x = rules.undamped(t_operator, t_b, t_x0)
    else:
        # `damp` is traced: choose at run time (under `vmap` both branches run).
        zeros = tree_zeros(in_struct)
        t_x = jax.lax.cond(
            damp > 0,
            lambda a, b_, d, x0_: _sum(zeros, rules.damped(a, b_, d, x0_)),
            lambda a, b_, d, x0_: _sum(zeros, rules.undamped(a, b_, x0_)),
            t_operator,
            t_b,
            t_damp,
            t_x0,
        )
    return out, (t_x, None, no_stats)


class _Rules(eqx.Module):
    """The tangent of $x$ as a linear function of the input tangents.

    Notation: $A$ is $m \\times n$, $r = b - A x$, $\\dot{}$ marks tangents and
    $M = A^\\mathsf{T} A + \\lambda^2 I$.
    """

    operator: lx.AbstractLinearOperator
    b: PyTree[Array]
    damp: Array
    x0: PyTree[Array] | None
    x: PyTree[Array]
    stats: dict
    solver: AbstractLeastSquaresSolver
    throw: bool

    # Products with $A$, $\dot A$ and their transposes.

    def mv(self, v):
        return self.operator.mv(v)

    def rmv_operator(self) -> lx.AbstractLinearOperator:
        # Aᵀ as a function operator: its products never materialise a transpose.
        _, rmv = matvecs(self.operator)
        return lx.FunctionLinearOperator(rmv, self.operator.out_structure())

    def _jvp(self, fn, t_operator):
        out, t_out = eqx.filter_jvp(fn, (self.operator,), (t_operator,))
        # Leaves that do not depend on the operator come back as symbolic zeros.
        return _materialise(t_out, out)

    def dmv(self, t_operator, v):
        """$\\dot A v$."""
        return self._jvp(lambda op: op.mv(v), t_operator)

    def minus_dmv(self, t_operator, v):
        """$-\\dot A v$, or `None` for a symbolic-zero $\\dot A$."""
        return None if t_operator is None else _neg(self.dmv(t_operator, v))

    def drmv(self, t_operator, u):
        """$\\dot A^\\mathsf{T} u$."""
        return self._jvp(lambda op: matvecs(op)[1](u), t_operator)

    def residual(self):
        return tree_sub(self.b, self.mv(self.x))

    def difference(self):
        """$x - x_0$."""
        return self.x if self.x0 is None else tree_sub(self.x, self.x0)

    def solve(self, operator, vector):
        return _linear_solve(operator, vector, self.solver, self.throw)

    # Damped, λ > 0. With K = [A; λI] and c = (b, λ x0), x = K⁺c and K has full
    # column rank, so ẋ = K⁺(ċ − K̇x) + (KᵀK)⁻¹K̇ᵀ(c − Kx) (Golub–Pereyra). Here
    # ċ − K̇x = (ḃ − Ȧx, λẋ0 + λ̇(x0 − x)), K̇ᵀ(c − Kx) = Ȧᵀr + λλ̇(x0 − x), and
    # (KᵀK)⁻¹g = M⁻¹g = K⁺(0, g/λ), which folds everything into ONE solve:
    #     ẋ = K⁺(ḃ − Ȧx, λẋ0 + 2λ̇(x0 − x) + Ȧᵀr/λ).
    # The Ȧᵀr/λ block is huge when λ ≪ ‖A‖ and r ≠ 0; the solver's relative
    # tolerance then applies to it and M⁻¹Ȧᵀr loses about log10(‖A‖‖r‖/(λ‖·‖))
    # digits. The guarded fallback computes M⁻¹Ȧᵀr = K⁺K⁺ᵀȦᵀr instead (two solves).

    def augmented(self) -> lx.AbstractLinearOperator:
        damp = self.damp
        operator = self.operator
        return lx.FunctionLinearOperator(
            lambda v: (operator.mv(v), tree_scale(damp, v)), operator.in_structure()
        )

    def damped(self, t_operator, t_b, t_damp, t_x0):
        damp = self.damp
        in_struct = self.operator.in_structure()
        top = _sum(t_b, self.minus_dmv(t_operator, self.x))
        bottom = _sum(
            tree_scale(damp, t_x0) if t_x0 is not None else None,
            tree_scale(-2 * t_damp, self.difference()) if t_damp is not None else None,
        )
        if top is None:
            top = tree_zeros(self.operator.out_structure())
        if bottom is None:
            bottom = tree_zeros(in_struct)
        augmented = self.augmented()
        if t_operator is None:
            return self.solve(augmented, (top, bottom))
        r = self.residual()
        e = self.drmv(t_operator, r)

        def closed_form(top, bottom, e):
            safe = jnp.where(damp > 0, damp, 1)
            return self.solve(
                augmented, (top, tree_add(bottom, tree_scale(1 / safe, e)))
            )

        def fallback(top, bottom, e):
            t_top, t_bottom = self.solve(augmented.transpose(), e)
            return self.solve(
                augmented, (tree_add(top, t_top), tree_add(bottom, t_bottom))
            )

        # Closed form when its error, ≈ tol·‖A‖‖r‖/(λ σ ‖x‖), is harmless: λ not small
        # next to ‖A‖, or the residual small next to λ‖x‖ (nearly consistent).
        tol = max(self.solver.atol, self.solver.btol, float(jnp.finfo(damp.dtype).eps))
        norm_a = self.stats["norm_A"]
        norm_r = tree_norm(r).astype(damp.dtype)
        norm_d = tree_norm(self.difference()).astype(damp.dtype)
        ok = (damp >= tol**0.25 * norm_a) | (norm_r <= damp * norm_d)
        return jax.lax.cond(ok, closed_form, fallback, top, bottom, e)

    # Undamped, λ = 0: x = x0 + A⁺(b − A x0) = A⁺b + (I − A⁺A)x0. From
    # d(A⁺) = −A⁺ȦA⁺ + A⁺A⁺ᵀȦᵀ(I − AA⁺) + (I − A⁺A)ȦᵀA⁺ᵀA⁺ with d = x − x0:
    #     ẋ = q + A⁺(ḃ − Ȧx − Aq + A⁺ᵀȦᵀr),   q = ẋ0 + ȦᵀA⁺ᵀd.
    # Solves: A⁺ (per tangent), A⁺ᵀȦᵀr (per tangent; zero when A has full row
    # rank, r = 0), and y = A⁺ᵀd (once; its term vanishes with full column rank,
    # where A⁺A = I and the whole q-term cancels).

    def undamped(self, t_operator, t_b, t_x0):
        m = structure_size(self.operator.out_structure())
        n = structure_size(self.operator.in_structure())
        full_rank = self.solver.assume_full_rank()
        full_column_rank = full_rank and m >= n
        full_row_rank = full_rank and m <= n
        rhs = _sum(t_b, self.minus_dmv(t_operator, self.x))
        transposed = self.rmv_operator() if t_operator is not None else None
        q = None
        if not full_column_rank:
            q = t_x0
            if t_operator is not None:
                y = self.solve(transposed, self.difference())
                q = _sum(q, self.drmv(t_operator, y))
        if t_operator is not None and not full_row_rank:
            e = self.drmv(t_operator, self.residual())
            # When the forward solve certified a compatible system (istop 1 or 4),
            # ‖r‖ ≤ btol‖b‖ + atol‖A‖‖x‖ and this term is no larger than the error
            # of the solves themselves: skip its solve at run time.
            istop = self.stats["istop"]
            compatible = (istop == 1) | (istop == 4)
            zeros = tree_zeros(self.operator.out_structure())
            term = jax.lax.cond(
                compatible,
                lambda e: zeros,
                lambda e: self.solve(transposed, e),
                e,
            )
            rhs = _sum(rhs, term)
        if q is not None:
            rhs = _sum(rhs, _neg(self.mv(q)))
        if rhs is None:
            return q
        return _sum(self.solve(self.operator, rhs), q)


# ---------------------------------------------------------------------------------
# The entry point.
# ---------------------------------------------------------------------------------


@eqx.filter_jit
def _lstsq(operator, vector, solver, damp, x0, preconditioner, throw, damped):
    if preconditioner is None:
        x, istop, stats = _solution(
            operator, vector, damp, x0, solver=solver, damped=damped, throw=throw
        )
    else:
        # Solve min ‖A N y − (b − A x0)‖² + λ²‖y‖², then x = x0 + N y. Derivatives
        # flow through the composition (the rule above sees the operator A N).
        b = vector if x0 is None else tree_sub(vector, operator.mv(x0))
        y, istop, stats = _solution(
            operator @ preconditioner,
            b,
            damp,
            None,
            solver=solver,
            damped=damped,
            throw=throw,
        )
        x = preconditioner.mv(y)
        if x0 is not None:
            x = tree_add(x0, x)
        stats = dict(stats, norm_x=tree_norm(x).astype(stats["norm_x"].dtype))
    stats = jax.lax.stop_gradient(stats)
    result = istop_to_result(istop)
    if throw:
        x = eqx.branched_error_if(
            x, failed(istop), message_index(istop), error_messages(solver.name)
        )
    return Solution(value=x, result=result, stats=stats)


def lstsq(
    operator: lx.AbstractLinearOperator | Float[ArrayLike, "m n"],
    vector: PyTree[ArrayLike],
    solver: AbstractLeastSquaresSolver = LSMR(),
    *,
    damp: Float[ArrayLike, ""] = 0.0,
    x0: PyTree[ArrayLike] | None = None,
    preconditioner: lx.AbstractLinearOperator | None = None,
    throw: bool = True,
) -> Solution:
    r"""Solve the (damped) least-squares problem

    $$\min_x \|A x - b\|_2^2 + \lambda^2 \|x - x_0\|_2^2$$

    matrix-free, with [`matfree_lstsq.LSMR`][] or [`matfree_lstsq.LSQR`][], and
    differentiably: `Solution.value` supports `jax.jvp`, `jax.vjp`, `jax.grad`,
    `jax.jacfwd`/`jacrev`, `jax.hessian`, higher orders and `jax.vmap` of each,
    with respect to `vector`, `damp`, `x0` and every array inside `operator`.

    Without damping and with $x_0 = 0$, the converged solution is the minimum-norm
    least-squares solution $A^+ b$. With an initial guess, the solver iterates on
    $d = x - x_0$ with right-hand side $b - A x_0$ (SciPy's convention), so it returns
    the solution closest to $x_0$: when $\lambda > 0$ or $A$ has a null space, $x_0$
    changes the answer (and has a non-zero derivative).

    **Arguments:**

    - `operator`: $A$, any `lineax.AbstractLinearOperator` (matrix, function,
        Jacobian, pytree, composed, ...) or a 2-D array. Its input and output
        structures may be arbitrary pytrees; real or complex (complex inputs are
        solved, but not differentiated).
    - `vector`: $b$, a pytree with the structure, shapes and dtypes of
        `operator.out_structure()`.
    - `solver`: `LSMR()` (default) or `LSQR()`, with the stopping tolerances. The
        solves inside derivatives reuse it.
    - `damp`: $\lambda \ge 0$, a real scalar (may be traced).
    - `x0`: $x_0$, a pytree like `operator.in_structure()`, or `None` for zero.
    - `preconditioner`: a lineax operator $N$ (from the input space of $A$ to itself)
        applied on the right: the solver minimises
        $\|A N y - (b - A x_0)\|^2 + \lambda^2 \|y\|^2$ and returns $x = x_0 + N y$.
        For invertible $N$ and $\lambda = 0$ this is the same least-squares problem,
        better conditioned when $A N$ is. When $A$ is rank-deficient the solution is
        no longer the minimum-norm one: it minimises $\|N^{-1}(x - x_0)\|$ among the
        least-squares solutions, and with $\lambda > 0$ damping penalises
        $\|N^{-1}(x - x_0)\|$ rather than $\|x - x_0\|$.
    - `throw`: if `True` (default), raise an error when the solve fails (step limit,
        condition limit, non-finite input), including a solve inside a derivative.
        If `False`, never raise, in the forward or the backward pass; inspect
        `Solution.result` and `Solution.stats` instead.

    **Returns:**

    A [`matfree_lstsq.Solution`][] with `value` ($x$), `result` and `stats`.
    """
    if not isinstance(solver, AbstractLeastSquaresSolver):
        raise TypeError(
            f"`solver` must be `matfree_lstsq.LSMR` or `matfree_lstsq.LSQR`; got "
            f"{type(solver).__name__}."
        )
    operator = as_operator(operator)
    in_struct, out_struct = operator.in_structure(), operator.out_structure()
    vector = check_structure(vector, out_struct, "`vector`")
    if x0 is not None:
        x0 = check_structure(x0, in_struct, "`x0`")
    if preconditioner is not None:
        if not isinstance(preconditioner, lx.AbstractLinearOperator):
            raise TypeError(
                "`preconditioner` must be a lineax operator; got "
                f"{type(preconditioner).__name__}."
            )
        for name, got in (
            ("input", preconditioner.in_structure()),
            ("output", preconditioner.out_structure()),
        ):
            if not same_structure(got, in_struct):
                raise ValueError(
                    f"`preconditioner` must map the operator's input space to itself; "
                    f"its {name} structure is {got}, the operator's input structure "
                    f"is {in_struct}."
                )
    _, rdtype = scalar_dtypes(in_struct, out_struct)
    # Which derivative rule applies is static when `damp` is a concrete number.
    checked = _check_damp(damp, rdtype)
    damped: Literal[True, False] | None
    damped = None if isinstance(damp, Tracer) else bool(np.asarray(damp) > 0)
    damp = checked
    return _lstsq(operator, vector, solver, damp, x0, preconditioner, throw, damped)
