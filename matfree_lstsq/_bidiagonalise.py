"""Golub–Kahan (lower) bidiagonalisation."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PyTree

from ._operator import (
    as_operator,
    check_structure,
    matvecs,
    scalar_dtypes,
    structure_size,
    tree_norm,
    tree_orthogonalise,
    tree_scale,
    tree_sub,
    tree_where,
)


class GolubKahan(eqx.Module):
    r"""The result of [`matfree_lstsq.bidiagonalise`][] after $k$ steps.

    With $U_{k+1} = [u_1, \dots, u_{k+1}]$, $V_{k+1} = [v_1, \dots, v_{k+1}]$ and the
    $(k+1) \times k$ lower-bidiagonal $B_k$ with diagonal $\alpha_1, \dots, \alpha_k$
    and subdiagonal $\beta_2, \dots, \beta_{k+1}$, the two Golub–Kahan relations are

    $$\beta_1 u_1 = b, \qquad A V_k = U_{k+1} B_k, \qquad
    A^\mathsf{H} U_{k+1} = V_k B_k^\mathsf{T}
        + \alpha_{k+1} v_{k+1} e_{k+1}^\mathsf{T}.$$

    **Attributes:**

    - `left`: $U_{k+1}$, a pytree shaped like the operator's output with a leading
        axis of length $k + 1$.
    - `right`: $V_{k+1}$, a pytree shaped like the operator's input with a leading
        axis of length $k + 1$.
    - `alpha`: $(\alpha_1, \dots, \alpha_{k+1})$, shape `(k + 1,)`, real.
    - `beta`: $(\beta_1, \dots, \beta_{k+1})$, shape `(k + 1,)`, real;
        $\beta_1 = \|b\|$.

    When the process terminates early (an invariant subspace is found, or
    $k = \min(m, n)$ exhausts the space), a coefficient at the level of rounding
    errors (below $\sqrt{\min(m, n)}\,\varepsilon$ times the largest coefficient
    so far) is set to zero together with its basis vector; both relations still hold.
    A coefficient just above that level may remain.
    """

    left: PyTree[Array]
    right: PyTree[Array]
    alpha: Float[Array, " k+1"]
    beta: Float[Array, " k+1"]

    @property
    def num_steps(self) -> int:
        """$k$, the number of steps taken."""
        return self.alpha.shape[0] - 1

    def bidiagonal(self) -> Float[Array, "k+1 k"]:
        r"""The dense $(k+1) \times k$ lower-bidiagonal matrix $B_k$."""
        k = self.num_steps
        diag = jnp.diag(self.alpha[:k])
        sub = jnp.diag(self.beta[1:])  # (k, k): β₂..β_{k+1} on the diagonal
        zeros_row = jnp.zeros((1, k), self.alpha.dtype)
        return jnp.concatenate([diag, zeros_row]) + jnp.concatenate([zeros_row, sub])


def _normalise(
    x: PyTree[Array], threshold: Float[Array, ""]
) -> tuple[PyTree[Array], Float[Array, ""]]:
    """Normalise `x`; a norm at or below `threshold` counts as breakdown (zero)."""
    norm = tree_norm(x).astype(threshold.dtype)
    ok = norm > threshold
    x = tree_scale(1 / jnp.where(ok, norm, 1), x)
    return tree_where(ok, x, jtu.tree_map(jnp.zeros_like, x)), jnp.where(ok, norm, 0)


def bidiagonalise(
    operator: lx.AbstractLinearOperator | Float[ArrayLike, "m n"],
    vector: PyTree[ArrayLike],
    num_steps: int,
    *,
    reorthogonalise: bool = True,
) -> GolubKahan:
    r"""Run $k$ = `num_steps` steps of the lower Golub–Kahan bidiagonalisation of $A$
    started from $b$ = `vector`: the process behind LSQR and LSMR.

    $$\beta_1 u_1 = b,\quad \alpha_1 v_1 = A^\mathsf{H} u_1,\quad
    \beta_{i+1} u_{i+1} = A v_i - \alpha_i u_i,\quad
    \alpha_{i+1} v_{i+1} = A^\mathsf{H} u_{i+1} - \beta_{i+1} v_i.$$

    **Arguments:**

    - `operator`: a lineax operator or a 2-D array, $m \times n$; any input and
        output pytree structures.
    - `vector`: the starting vector $b$, with the operator's output structure.
    - `num_steps`: $k$, a Python int in $[0, \min(m, n)]$.
    - `reorthogonalise`: orthogonalise each new basis vector against all previous ones
        (two passes of classical Gram–Schmidt). Without it, orthogonality is lost in
        floating point once singular values converge. Memory is
        $(k+1)(m+n)$ numbers either way, since the bases are returned.

    **Returns:**

    A [`matfree_lstsq.GolubKahan`][] with the bases and the coefficients.

    **References:**

    G. Golub and W. Kahan, *Calculating the singular values and pseudo-inverse of a
    matrix*, SIAM J. Numer. Anal. 2(2), 1965.
    """
    operator = as_operator(operator)
    in_struct, out_struct = operator.in_structure(), operator.out_structure()
    vector = check_structure(vector, out_struct, "`vector`")
    m, n = structure_size(out_struct), structure_size(in_struct)
    if (
        not isinstance(num_steps, (int, np.integer))
        or isinstance(num_steps, bool)
        or not 0 <= num_steps <= min(m, n)
    ):
        raise ValueError(
            f"`num_steps` must be an int in [0, min(m, n)] = [0, {min(m, n)}] for this "
            f"{m}×{n} operator; got {num_steps!r}."
        )
    _, rdtype = scalar_dtypes(in_struct, out_struct)
    mv, rmv = matvecs(operator)
    k = num_steps

    # Storage in whole blocks of rows: step i orthogonalises against the i rows filled
    # so far, a block at a time, instead of against all k + 1 (mostly zero) rows.
    block = min(k + 1, 32)
    rows_alloc = -(-(k + 1) // block) * block

    def stack_zeros(struct):
        return jtu.tree_map(
            lambda s: jnp.zeros((rows_alloc, *s.shape), s.dtype), struct
        )

    def set_row(basis, i, x):
        return jtu.tree_map(lambda bl, xl: bl.at[i].set(xl), basis, x)

    # A norm below `tiny` times the scale of the problem is rounding noise: breakdown.
    eps = jnp.asarray(jnp.finfo(rdtype).eps, rdtype)

    u, beta1 = _normalise(vector, jnp.zeros((), rdtype))
    v, alpha1 = _normalise(rmv(u), jnp.zeros((), rdtype))
    # Scale for breakdown detection: running max of the coefficients (≈ ‖A‖).
    scale0 = alpha1
    left = set_row(stack_zeros(out_struct), 0, u)
    right = set_row(stack_zeros(in_struct), 0, v)
    alphas = jnp.zeros((k + 1,), rdtype).at[0].set(alpha1)
    betas = jnp.zeros((k + 1,), rdtype).at[0].set(beta1)

    def body(i, carry):
        left, right, alphas, betas, u, v, scale = carry
        tol = jnp.sqrt(jnp.asarray(min(m, n), rdtype)) * eps * scale
        u_new = tree_sub(mv(v), tree_scale(alphas[i - 1], u))
        if reorthogonalise:
            u_new = tree_orthogonalise(u_new, left, num_rows=i, block=block)
        u_new, beta = _normalise(u_new, tol)
        scale = jnp.maximum(scale, beta)
        v_new = tree_sub(rmv(u_new), tree_scale(beta, v))
        if reorthogonalise:
            v_new = tree_orthogonalise(v_new, right, num_rows=i, block=block)
        v_new, alpha = _normalise(v_new, tol)
        scale = jnp.maximum(scale, alpha)
        left = set_row(left, i, u_new)
        right = set_row(right, i, v_new)
        alphas = alphas.at[i].set(alpha)
        betas = betas.at[i].set(beta)
        return left, right, alphas, betas, u_new, v_new, scale

    carry = (left, right, alphas, betas, u, v, scale0)
    if k > 0:
        carry = jax.lax.fori_loop(1, k + 1, body, carry)
    left, right, alphas, betas, *_ = carry
    left, right = jtu.tree_map(lambda x: x[: k + 1], (left, right))
    return GolubKahan(left=left, right=right, alpha=alphas, beta=betas)
