"""The solution object, SciPy's stopping codes and their mapping onto lineax results."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike, Bool, Int, PyTree


RESULTS = lx.RESULTS


class Solution(eqx.Module):
    """The outcome of [`matfree_lstsq.lstsq`][].

    **Attributes:**

    - `value`: the solution $x$, a pytree with the operator's input structure.
    - `result`: a [`matfree_lstsq.RESULTS`][] item (the same object as
        `lineax.RESULTS`); `RESULTS.successful` unless the solver hit
        its step limit (`max_steps_reached`), its condition limit (`conlim`), or met a
        NaN/inf in the inputs (`nonfinite_input`).
    - `stats`: a dictionary of scalars:
        - `num_steps`: iterations taken;
        - `istop`: SciPy's stopping code (0 the zero solution is exact, 1 compatible
          system solved to `atol`/`btol`, 2 least-squares solution to `atol`, 3
          condition limit, 4–6 the same three tests at machine precision, 7 step
          limit; -1 invalid input: NaN or inf, or a negative `damp`, and then
          `value` is NaN);
        - `norm_r`: estimate of $\\sqrt{\\|b - Ax\\|^2 + \\lambda^2\\|x - x_0\\|^2}$;
        - `norm_Ar`: estimate of $\\|A^\\mathsf{H}(b - Ax) - \\lambda^2 (x - x_0)\\|$;
        - `norm_A`: estimate of the Frobenius norm of $A$ (LSQR: of $[A; \\lambda I]$);
        - `cond_A`: estimate of the condition number of $A$ (as SciPy computes it);
        - `norm_x`: $\\|x\\|$ of the returned solution.
    """

    value: PyTree[Array]
    result: lx.RESULTS
    stats: dict[str, Any]


# istop codes, SciPy's numbering; -1 is ours, for non-finite input.
ISTOP_NONFINITE = -1
ISTOP_ZERO = 0
ISTOP_COMPATIBLE = 1
ISTOP_LSTSQ = 2
ISTOP_CONLIM = 3
ISTOP_COMPATIBLE_EPS = 4
ISTOP_LSTSQ_EPS = 5
ISTOP_CONLIM_EPS = 6
ISTOP_MAX_STEPS = 7


def istop_to_result(istop: Int[Array, ""]) -> lx.RESULTS:
    """Map SciPy's `istop` onto lineax's `RESULTS`."""
    conlim = (istop == ISTOP_CONLIM) | (istop == ISTOP_CONLIM_EPS)
    result = RESULTS.where(
        istop == ISTOP_MAX_STEPS, RESULTS.max_steps_reached, RESULTS.successful
    )
    result = RESULTS.where(conlim, RESULTS.conlim, result)
    return RESULTS.where(istop == ISTOP_NONFINITE, RESULTS.nonfinite_input, result)


def stopping_code(
    *,
    test1: Array,
    test2: Array,
    test3: Array,
    t1: Array,
    rtol: Array,
    atol: ArrayLike,
    ctol: ArrayLike,
    at_max_steps: Bool[Array, ""],
) -> Int[Array, ""]:
    """SciPy's LSQR/LSMR stopping rules, in SciPy's order of precedence.

    `test1 = ‖r‖/‖b‖` (compatible systems), `test2 = ‖Aᴴr‖/(‖A‖‖r‖)` (least squares),
    `test3 = 1/cond(A)`, `t1 = test1/(1 + ‖A‖‖x‖/‖b‖)`, `rtol = btol + atol‖A‖‖x‖/‖b‖`.
    The machine-precision variants (4–6) guard against tolerances set below the
    working precision; later tests take precedence over earlier ones.
    """
    one = jnp.ones((), test1.dtype)
    istop = jnp.where(at_max_steps, ISTOP_MAX_STEPS, ISTOP_ZERO)
    istop = jnp.where(one + test3 <= one, ISTOP_CONLIM_EPS, istop)
    istop = jnp.where(one + test2 <= one, ISTOP_LSTSQ_EPS, istop)
    istop = jnp.where(one + t1 <= one, ISTOP_COMPATIBLE_EPS, istop)
    istop = jnp.where(test3 <= ctol, ISTOP_CONLIM, istop)
    istop = jnp.where(test2 <= atol, ISTOP_LSTSQ, istop)
    istop = jnp.where(test1 <= rtol, ISTOP_COMPATIBLE, istop)
    return istop.astype(jnp.int32)


def error_messages(solver_name: str, context: str = "") -> tuple[str, ...]:
    """Messages indexed by `message_index`, for `eqx.branched_error_if`."""
    where = f" ({context})" if context else ""
    return (
        "",
        f"{solver_name} reached `max_steps` before meeting its tolerances{where}. "
        "Increase `max_steps`, loosen `atol`/`btol`, pass a `preconditioner` or a "
        "positive `damp`, or pass `throw=False` to get the last iterate and inspect "
        "`Solution.result` and `Solution.stats`.",
        f"{solver_name} stopped because the estimated condition number of the "
        f"operator exceeded `conlim`{where}. The problem is too ill-conditioned for "
        "the requested accuracy: increase `conlim`, add damping (`damp > 0`), or pass "
        "`throw=False` to accept the iterate.",
        f"{solver_name} found invalid input{where}: the vector, `x0`, `damp` or the "
        "operator's output holds NaN or inf, or `damp` is negative. Check the "
        "inputs, or pass `throw=False` to get `RESULTS.nonfinite_input` (and a NaN "
        "solution) without raising.",
    )


def compatible(istop: Int[Array, ""]) -> Bool[Array, ""]:
    """Whether `istop` certifies a compatible system (`‖r‖ ≤ btol‖b‖ + atol‖A‖‖x‖`)."""
    return (istop == ISTOP_COMPATIBLE) | (istop == ISTOP_COMPATIBLE_EPS)


def message_index(istop: Int[Array, ""]) -> Int[Array, ""]:
    conlim = (istop == ISTOP_CONLIM) | (istop == ISTOP_CONLIM_EPS)
    index = jnp.where(istop == ISTOP_MAX_STEPS, 1, 0)
    index = jnp.where(conlim, 2, index)
    return jnp.where(istop == ISTOP_NONFINITE, 3, index)


def failed(istop: Int[Array, ""]) -> Bool[Array, ""]:
    return message_index(istop) != 0
