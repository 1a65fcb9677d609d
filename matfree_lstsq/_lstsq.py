"""`lstsq`: the entry point."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jax.core import Tracer
from jaxtyping import Array, ArrayLike, Float, PyTree

from ._lsmr import LSMR
from ._operator import (
    as_operator,
    check_structure,
    scalar_dtypes,
    tree_add,
)
from ._solution import (
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
    arr = jnp.asarray(damp)
    if arr.shape != () or jnp.iscomplexobj(arr):
        raise ValueError(
            f"`damp` must be a real scalar; got an array of shape {arr.shape} and "
            f"dtype {arr.dtype}."
        )
    if bool(arr < 0):
        raise ValueError(f"`damp` must be non-negative; got {damp!r}.")
    return arr.astype(rdtype)


@eqx.filter_jit
def _lstsq(operator, vector, solver, damp, x0, preconditioner, throw):
    if preconditioner is not None:
        # Solve min ‖A N y − (b − A x0)‖² + λ²‖y‖², then x = x0 + N y.
        b = vector
        if x0 is not None:
            b = jax.tree_util.tree_map(lambda a, c: a - c, b, operator.mv(x0))
        y, istop, stats = solve(
            solver, operator @ preconditioner, b, damp=damp, x0=None
        )
        x = preconditioner.mv(y)
        if x0 is not None:
            x = tree_add(x0, x)
        from ._operator import tree_norm

        stats = dict(stats, norm_x=tree_norm(x).astype(stats["norm_x"].dtype))
    else:
        x, istop, stats = solve(solver, operator, vector, damp=damp, x0=x0)
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

    matrix-free, with [`matfree_lstsq.LSMR`][] or [`matfree_lstsq.LSQR`][].

    Without damping and with $x_0 = 0$, the converged solution is the minimum-norm
    least-squares solution $A^+ b$. With an initial guess, the solver iterates on
    $d = x - x_0$ with right-hand side $b - A x_0$ (SciPy's convention), so it returns
    the solution closest to $x_0$: when $\lambda > 0$ or $A$ has a null space, $x_0$
    changes the answer.

    **Arguments:**

    - `operator`: $A$, any `lineax.AbstractLinearOperator` (matrix, function,
        Jacobian, pytree, composed, ...) or a 2-D array. Its input and output
        structures may be arbitrary pytrees; real or complex.
    - `vector`: $b$, a pytree with the structure, shapes and dtypes of
        `operator.out_structure()`.
    - `solver`: `LSMR()` (default) or `LSQR()`, with the stopping tolerances.
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
        condition limit, non-finite input). If `False`, never raise; inspect
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
            if jax.tree_util.tree_structure(got) != jax.tree_util.tree_structure(
                in_struct
            ) or any(
                (a.shape, a.dtype) != (c.shape, c.dtype)
                for a, c in zip(
                    jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(in_struct)
                )
            ):
                raise ValueError(
                    f"`preconditioner` must map the operator's input space to itself; "
                    f"its {name} structure is {got}, the operator's input structure "
                    f"is {in_struct}."
                )
    _, rdtype = scalar_dtypes(in_struct, out_struct)
    damp = _check_damp(damp, rdtype)
    return _lstsq(operator, vector, solver, damp, x0, preconditioner, throw)
