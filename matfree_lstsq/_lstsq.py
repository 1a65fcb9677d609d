"""`lstsq`: the differentiable entry point, and its derivative rules.

The solution map $(A, b, \\lambda, x_0) \\mapsto x$ gets a custom JVP whose tangent is
assembled from *linear* solves, `lineax.linear_solve` with this package's solver. Those
are transposable (the transpose of a solve with $A$ is a solve with $A^\\mathsf{T}$), so
JAX derives reverse mode, and every composition of modes, by linearising and
transposing this one rule: a VJP costs as many solves as a JVP.
"""

from typing import Any

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
    tree_where,
    tree_zeros,
)
from ._solution import (
    ISTOP_NONFINITE,
    RESULTS,
    Solution,
    compatible,
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
# Derivative solves: transposable solves with K = [A; λI] and with Kᴴ.
# ---------------------------------------------------------------------------------


class _Stack(eqx.Module):
    """The operator of one derivative solve: `K = [A; λI]` (just `A` when `damp` is
    `None`, a static zero), possibly conjugated and/or transposed. It doubles as
    that solve's lineax state (gradient-stopped by `lx.linear_solve`), so that a
    transposed or conjugated solve still knows `A` and `λ` separately.

    - A solve with `K` returns `K⁺(top, bottom) = M⁻¹(Aᴴtop + λ bottom)`, by the
      solver run on the stacked operator.
    - A solve with `Kᴴ` returns the minimum-norm `(p, g)` with `Aᴴp + λg = w`:
      `p = (AAᴴ + λ²I)⁻¹A w` is a *damped* solve with `Aᴴ` (no block is divided by
      λ first, and the solver's relative tolerance applies to `p` alone), and
      `g = (w − Aᴴp)/λ = λM⁻¹w` follows in closed form (0 when λ = 0). Solving the
      wide `Kᴴ` itself would measure `p` against `g`, which holds `w_null/λ`.
    """

    operator: lx.AbstractLinearOperator
    damp: Array | None
    transposed: bool = eqx.field(static=True, default=False)
    conjugated: bool = eqx.field(static=True, default=False)

    def base(self) -> lx.AbstractLinearOperator:
        """`A`, or its entrywise conjugate."""
        op = self.operator
        complex_ = is_complex(op.in_structure()) or is_complex(op.out_structure())
        return lx.conj(op) if (self.conjugated and complex_) else op

    def as_operator(self) -> lx.AbstractLinearOperator:
        a = self.base()
        if self.damp is None:
            return a.transpose() if self.transposed else a
        damp = self.damp
        if self.transposed:
            at = a.transpose()
            return lx.FunctionLinearOperator(
                lambda z: tree_add(at.mv(z[0]), tree_scale(damp, z[1])),
                (a.out_structure(), a.in_structure()),
            )
        return lx.FunctionLinearOperator(
            lambda v: (a.mv(v), tree_scale(damp, v)), a.in_structure()
        )

    def transpose(self) -> "_Stack":
        return _Stack(self.operator, self.damp, not self.transposed, self.conjugated)

    def conj(self) -> "_Stack":
        return _Stack(self.operator, self.damp, self.transposed, not self.conjugated)

    def adjoint(self) -> "_Stack":
        return self.transpose().conj()


def _nan_like(x):
    return jtu.tree_map(lambda leaf: jnp.full_like(leaf, jnp.nan), x)


def _propagate_nan(vector, out):
    """`out + 0·Σvector`: NaN wherever `vector` holds NaN or inf, else `out`.

    Linear in `(vector, out)`, so JAX transposes it too: a NaN cotangent gives a NaN
    gradient, never a clean zero. (XLA does not fold `0·v` to 0 for floats.)
    """
    sums = [jnp.sum(jnp.real(leaf)) for leaf in jtu.tree_leaves(vector)]
    total = sums[0]
    for term in sums[1:]:
        total = total + term.astype(total.dtype)
    return jtu.tree_map(lambda leaf: leaf + (0 * total).astype(leaf.dtype), out)


class _DerivativeSolver(lx.AbstractLinearSolver):
    """The forward solver, reused for the solves inside a derivative.

    Its state is a `_Stack`, passed explicitly to `lx.linear_solve`; lineax's
    transpose and conjugation rules flip the stack's flags. lineax's transpose rule
    always asks for `throw=True`; this wrapper decides instead: it reports success
    to lineax, and raises its own message (naming the derivative solve) only when
    the user passed `throw=True` to `lstsq`.
    """

    solver: AbstractLeastSquaresSolver
    throw: bool = eqx.field(static=True)
    # What lineax's own derivative rules (second order) may assume about K.
    full_rank: bool = eqx.field(static=True)

    def init(self, operator, options):
        raise NotImplementedError("derivative solves are given their state")

    def compute(self, state: _Stack, vector, options):
        del options
        a = state.base()
        if state.damp is None:
            op = a.transpose() if state.transposed else a
            x, istop, stats = solve(self.solver, op, vector, damp=None, x0=None)
        elif state.transposed:
            at = a.transpose()
            damp = state.damp
            p, istop, stats = solve(self.solver, at, vector, damp=damp, x0=None)
            inv = jnp.where(damp != 0, 1 / jnp.where(damp != 0, damp, 1), 0)
            x = (p, tree_scale(inv, tree_sub(vector, at.mv(p))))
        else:
            x, istop, stats = solve(
                self.solver, state.as_operator(), vector, damp=None, x0=None
            )
        # lineax turns a non-finite solution into an error (its transposes always
        # throw): return zeros here; `_Rules.solve` puts the NaN back.
        x = tree_where(istop == ISTOP_NONFINITE, jtu.tree_map(jnp.zeros_like, x), x)
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

    def transpose(self, state: _Stack, options):
        return state.transpose(), options

    def conj(self, state: _Stack, options):
        return state.conj(), options

    def assume_full_rank(self):
        return self.full_rank


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
def _solution(operator, vector, damp, x0, *, solver, damping, throw):
    del damping, throw
    x, istop, stats = solve(solver, operator, vector, damp=damp, x0=x0)
    # Invalid input (NaN or inf, a negative `damp`) gives NaN, never a clean number.
    x = tree_where(istop == ISTOP_NONFINITE, _nan_like(x), x)
    return x, istop, stats


@_solution.def_jvp
def _solution_jvp(primals, tangents, *, solver, damping, throw):
    operator, b, damp, x0 = primals
    t_operator, t_b, t_damp, t_x0 = tangents
    out = _solution(operator, b, damp, x0, solver=solver, damping=damping, throw=throw)
    x, istop, stats = out
    no_stats = jtu.tree_map(lambda _: None, stats)
    if not (_any(t_operator) or _any(t_b) or _any(t_damp) or _any(t_x0)):
        return out, (None, None, no_stats)
    rules = _Rules(
        operator,
        lx.linearise(operator),
        b,
        None if damping == "zero" else damp,
        x0,
        x,
        stats,
        solver,
        throw,
        damping == "positive",
    )
    t_operator = _materialise(t_operator, operator) if _any(t_operator) else None
    t_b = _materialise(t_b, b) if _any(t_b) else None
    t_damp = t_damp if (_any(t_damp) and damping == "traced") else None
    t_x0 = _materialise(t_x0, x0) if (_any(t_x0) and x0 is not None) else None
    t_x = rules.tangent(t_operator, t_b, t_damp, t_x0)
    if t_x is None:
        t_x = tree_zeros(operator.in_structure())
    # Invalid input: NaN derivatives too (a scaling, so still linear in the tangents).
    t_x = tree_scale(jnp.where(istop == ISTOP_NONFINITE, jnp.nan, 1.0), t_x)
    return out, (t_x, None, no_stats)


class _Rules(eqx.Module):
    r"""The tangent of $x$ as a linear function of the input tangents, one rule for
    every $\lambda \ge 0$ and every rank.

    Notation: $A$ is $m \times n$, $d = x - x_0$, $r = b - A x$, $\dot{}$ marks
    tangents, $M = A^\mathsf{H} A + \lambda^2 I$ and $K = [A; \lambda I]$, so that
    $K^+(u, g) = M^{-1}(A^\mathsf{H}u + \lambda g)$ and $K^+K^{+\mathsf{H}} = M^{-1}$
    (for λ = 0 read pseudo-inverses: $K^+ = A^+$, $M^{-1} = (A^\mathsf{H}A)^+$).
    """

    operator: lx.AbstractLinearOperator  # as given: its tangents have this structure
    linear: lx.AbstractLinearOperator  # linearised once, for products and solves
    b: PyTree[Array]
    damp: Array | None  # None: a static zero
    x0: PyTree[Array] | None
    x: PyTree[Array]
    stats: dict
    solver: AbstractLeastSquaresSolver
    throw: bool = eqx.field(static=True)
    # λ is a concrete positive number, so K = [A; λI] has full column rank: lineax's
    # own rules (second order) may assume so. (Not for a traced λ, which may be 0.)
    positive_damp: bool = eqx.field(static=True)

    def _jvp(self, fn, t_operator):
        out, t_out = eqx.filter_jvp(fn, (self.operator,), (t_operator,))
        # Leaves that do not depend on the operator come back as symbolic zeros.
        return _materialise(t_out, out)

    def dmv(self, t_operator, v):
        """$\\dot A v$."""
        return self._jvp(lambda op: op.mv(v), t_operator)

    def drmv(self, t_operator, u):
        """$\\dot A^\\mathsf{H} u$."""
        return self._jvp(lambda op: matvecs(op)[1](u), t_operator)

    def solve(self, stack: _Stack, vector, full_rank: bool):
        dsolver = _DerivativeSolver(self.solver, self.throw, full_rank)
        out = lx.linear_solve(
            stack.as_operator(), vector, dsolver, state=stack, throw=False
        ).value
        return _propagate_nan(vector, out)

    # Differentiating the normal equations Aᴴr = λ²d (for λ = 0 the pseudo-inverse,
    # Golub and Pereyra 1973) gives, for every rank,
    #     M ẋ = Aᴴ(ḃ − Ȧx) + λ²ẋ0 + Ȧᴴr − 2λλ̇d.                                 (1)
    # Take (ρ, g_ρ) = K⁺ᴴd, so ρ = (AAᴴ + λ²I)⁻¹Ad and Aᴴρ = d − e, e = λg_ρ
    # (for λ = 0, ρ = A⁺ᴴd and e = 0), and write r = λ²ρ + r⊥ (r⊥ is about the part
    # of r in null(Aᴴ) when λ ≪ σ). Then (1) is
    #     ẋ = q + K⁺(ḃ − Ȧx − 2λλ̇ρ − Aq + p, g − 2λ̇e),  q = ẋ0 + Ȧᴴρ,
    #     (p, g) = K⁺ᴴȦᴴr⊥,
    # the "x0 form" q + K⁺(c − Aq, 0) = M⁻¹(Aᴴc + λ²q) carrying q. Nothing is divided
    # by λ: the λ̇ blocks are −2λλ̇ρ and −2λ̇e, of their own size, and the only large
    # block, g, is λM⁻¹Ȧᴴr⊥, which K⁺ multiplies by λ again. For λ = 0 this is
    # Golub–Pereyra's ẋ = q + A⁺(ḃ − Ȧx − Aq + A⁺ᴴȦᴴr). Solves: ρ (one, shared by
    # all tangents, damped like the forward solve), K⁺ᴴ for the residual term, and
    # the outer K⁺. With full column rank declared,
    # M⁻¹ has no null space to amplify the forward solve's error in r, and (1) is
    # ẋ = ẋ0 + K⁺(ḃ − Ȧx − Aẋ0 + p, g) with (p, g) = K⁺ᴴ(Ȧᴴr − 2λλ̇d): no ρ.

    def tangent(self, t_operator, t_b, t_damp, t_x0):
        A, damp = self.linear, self.damp
        m = structure_size(A.out_structure())
        n = structure_size(A.in_structure())
        full_rank = self.solver.assume_full_rank()
        full_column = full_rank and m >= n
        full_row = full_rank and m <= n
        d = self.x if self.x0 is None else tree_sub(self.x, self.x0)

        minus_dax = None if t_operator is None else _neg(self.dmv(t_operator, self.x))
        top = [t_b, minus_dax]
        q = [t_x0]
        bottom = []
        residual = []
        if t_operator is not None or t_damp is not None:
            r = tree_sub(self.b, A.mv(self.x)) if t_operator is not None else None
            if full_column:
                if t_operator is not None and not full_row:
                    residual.append(self.drmv(t_operator, r))
                if t_damp is not None:
                    assert damp is not None  # a traced λ is never a static zero
                    residual.append(tree_scale(-2 * damp * t_damp, d))
            else:
                g_rho = None
                if damp is None:
                    rho = self.solve(_Stack(A, None).adjoint(), d, full_rank)
                else:
                    # ρ from a damped solve, as well conditioned as the forward one;
                    # Aᴴρ = d − e with e = λg = λ²M⁻¹d (zero at λ = 0).
                    rho, g_rho = self.solve(
                        _Stack(A, damp).adjoint(), d, self.positive_damp
                    )
                if t_damp is not None:
                    assert damp is not None and g_rho is not None
                    top.append(tree_scale(-2 * damp * t_damp, rho))
                    # e = λg_ρ is known to ~tol‖d‖ (the solve's accuracy); below that
                    # it is rounding, whose null-space part K⁺ would multiply by 1/λ:
                    # drop it.
                    e = tree_scale(damp, g_rho)
                    bound = self._tol("atol") * tree_norm(d).astype(damp.dtype)
                    g_rho = _drop_below(g_rho, tree_norm(e), bound)
                    bottom.append(tree_scale(-2 * damp * t_damp, g_rho))
                if t_operator is not None:
                    q.append(self.drmv(t_operator, rho))
                if t_operator is not None and not full_row:
                    r_perp = (
                        r if damp is None else tree_sub(r, tree_scale(damp**2, rho))
                    )
                    residual.append(self.drmv(t_operator, self.certified(r_perp)))
        residual = _sum(*residual)
        if residual is not None:
            solved = self.solve(_Stack(A, damp).adjoint(), residual, self.positive_damp)
            if damp is None:
                top.append(solved)
            else:
                top.append(solved[0])
                bottom.append(solved[1])
        bottom = _sum(*bottom)
        q = _sum(*q)
        if q is not None and full_column and damp is None:
            q = None  # A⁺A = I: x0 has no effect, and neither has Ȧᴴρ.
        if q is not None:
            top.append(_neg(A.mv(q)))
        top = _sum(*top)
        if top is None and bottom is None:
            return q
        if top is None:
            top = tree_zeros(A.out_structure())
        if damp is None:
            vector = top
        else:
            vector = (top, tree_zeros(A.in_structure()) if bottom is None else bottom)
        k_full = full_column if damp is None else self.positive_damp
        return _sum(self.solve(_Stack(A, damp), vector, k_full), q)

    def _tol(self, name: str) -> float:
        eps = float(jnp.finfo(self.stats["norm_A"].dtype).eps)
        return max(float(getattr(self.solver, name)), eps)

    def certified(self, r_perp):
        """`r⊥`, or zero where it is no larger than the forward solve's tolerance.

        The computed `r = b − Ax` carries the forward solve's error `A(x̃ − x)`, of
        size up to `btol‖b‖ + atol‖A‖‖x‖` (the compatible-system test). Where that is
        all there is, the system is compatible to within the solve's tolerance and
        `r⊥ = 0` (a backward-stable choice): the residual term, amplified by up to
        1/λ² on null(A), would otherwise return that error as a derivative.
        """
        dtype = self.stats["norm_A"].dtype
        norm_b = tree_norm(self.b).astype(dtype)
        bound = (
            self._tol("btol") * norm_b
            + self._tol("atol") * self.stats["norm_A"] * self.stats["norm_x"]
        )
        # The forward solve's own certificate (istop 1 or 4: that test, on its
        # running estimate of ‖r‖, which may sit below the recomputed residual).
        norm = jnp.where(compatible(self.stats["istop"]), 0, tree_norm(r_perp))
        return _drop_below(r_perp, norm.astype(dtype), bound)


def _drop_below(x, norm, bound):
    """`x`, or zeros where `norm <= bound` (a `where`, not a branch)."""
    return tree_where(norm <= bound, jtu.tree_map(jnp.zeros_like, x), x)


# ---------------------------------------------------------------------------------
# The entry point.
# ---------------------------------------------------------------------------------


@eqx.filter_jit
def _lstsq(operator, vector, solver, damp, x0, preconditioner, throw, damping):
    if preconditioner is None:
        x, istop, stats = _solution(
            operator, vector, damp, x0, solver=solver, damping=damping, throw=throw
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
            damping=damping,
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
        structures may be arbitrary pytrees; real or complex.
    - `vector`: $b$, a pytree with the structure, shapes and dtypes of
        `operator.out_structure()`.
    - `solver`: `LSMR()` (default) or `LSQR()`, with the stopping tolerances. The
        solves inside derivatives reuse it.
    - `damp`: $\lambda \ge 0$, a real scalar (may be traced: a traced negative or
        NaN value is invalid input, reported as `RESULTS.nonfinite_input`).
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
    # A concrete zero `damp` drops the λ-blocks from the derivative rule (statically);
    # any other value, traced or not, runs the same rule.
    checked = _check_damp(damp, rdtype)
    if isinstance(damp, Tracer):
        damping = "traced"
    else:
        damping = "positive" if bool(np.asarray(damp) > 0) else "zero"
    return _lstsq(operator, vector, solver, checked, x0, preconditioner, throw, damping)
