"""The scalar curvature of the graph of a loss function.

The graph $\\{(\\theta, L(\\theta))\\}$ of a loss $L: \\mathbb{R}^n \\to \\mathbb{R}$
is a hypersurface of $\\mathbb{R}^{n+1}$ with induced metric
$G = I + g g^\\mathsf{T}$, $g = \\nabla L$. Its scalar curvature needs only the
gradient and Hessian-vector products of $L$ (Gauss' equation with the second
fundamental form $H / \\sqrt{\\beta}$, $\\beta = 1 + \\|g\\|^2$):

$$S = \\frac{(\\operatorname{tr} H)^2 - \\operatorname{tr}(H^2)}{\\beta}
- \\frac{2\\,(\\operatorname{tr} H \\cdot g^\\mathsf{T} H g - g^\\mathsf{T} H^2 g)}
{\\beta^2}.$$
"""

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar


_METHODS = ("exact", "hutchinson")


class CurvatureInfo(eqx.Module):
    r"""The ingredients of [`matfree_lstsq.applications.scalar_curvature`][].

    With $g = \nabla L$, $H = \nabla^2 L$ and $\beta = 1 + \|g\|^2$, the returned
    curvature is

    $$S = \frac{\texttt{trace\_h\_squared} - \texttt{trace\_h2}}{\beta}
    - \frac{2(\texttt{trace\_h}\cdot\texttt{g\_h\_g} - \texttt{norm\_hg2})}{\beta^2}.$$

    **Attributes:**

    - `trace_h`: $\operatorname{tr} H$ (Hutchinson: its estimate).
    - `trace_h_squared`: $(\operatorname{tr} H)^2$ (Hutchinson: the unbiased estimate
        $t_A t_B$, the product of the trace estimates of two independent probe sets;
        it differs from `trace_h**2`).
    - `trace_h2`: $\operatorname{tr}(H^2) = \|H\|_F^2$ (Hutchinson: its estimate).
    - `g_h_g`: $g^\mathsf{T} H g$ (always exact: one Hessian-vector product).
    - `norm_hg2`: $\|H g\|^2 = g^\mathsf{T} H^2 g$ (always exact).
    - `norm_g`: $\|g\|$.
    - `stderr`: the standard error of $S$, the square root of an unbiased estimate
        of its variance from the spread of the per-probe terms (exact for this
        estimator: it is linear in the probe means except for the product of the
        two trace estimates, whose variance is included); `0` for
        `method="exact"`.
    - `trace_h_stderr`, `trace_h2_stderr`: standard errors of `trace_h` and
        `trace_h2`; `0` for `method="exact"`.
    """

    trace_h: Float[Array, ""]
    trace_h_squared: Float[Array, ""]
    trace_h2: Float[Array, ""]
    g_h_g: Float[Array, ""]
    norm_hg2: Float[Array, ""]
    norm_g: Float[Array, ""]
    stderr: Float[Array, ""]
    trace_h_stderr: Float[Array, ""]
    trace_h2_stderr: Float[Array, ""]


def _combine(beta, trace_h_squared, trace_h2, trace_h, g_h_g, norm_hg2):
    return (trace_h_squared - trace_h2) / beta - 2 * (
        trace_h * g_h_g - norm_hg2
    ) / beta**2


def _flat_loss(loss_fn, params):
    flat, unravel = ravel_pytree(params)
    return (lambda x: loss_fn(unravel(x))), flat


@eqx.filter_jit
def _exact(loss_fn, params):
    f, x = _flat_loss(loss_fn, params)
    g, hvp = jax.linearize(jax.grad(f), x)
    # The columns of H, one Hessian-vector product per coordinate direction.
    h = jax.vmap(hvp)(jnp.eye(x.size, dtype=x.dtype))
    h = (h + h.T) / 2
    hg = hvp(g)
    norm_g2 = jnp.vdot(g, g)
    beta = 1 + norm_g2
    trace_h = jnp.trace(h)
    trace_h2 = jnp.sum(h * h)
    g_h_g = jnp.vdot(g, hg)
    norm_hg2 = jnp.vdot(hg, hg)
    s = _combine(beta, trace_h**2, trace_h2, trace_h, g_h_g, norm_hg2)
    zero = jnp.zeros((), x.dtype)
    info = CurvatureInfo(
        trace_h=trace_h,
        trace_h_squared=trace_h**2,
        trace_h2=trace_h2,
        g_h_g=g_h_g,
        norm_hg2=norm_hg2,
        norm_g=jnp.sqrt(norm_g2),
        stderr=zero,
        trace_h_stderr=zero,
        trace_h2_stderr=zero,
    )
    return s, info


def _sample_var(x):
    return jnp.var(x, ddof=1)


@eqx.filter_jit
def _hutchinson(loss_fn, params, key, num_probes):
    f, x = _flat_loss(loss_fn, params)
    g, hvp = jax.linearize(jax.grad(f), x)
    hg = hvp(g)
    norm_g2 = jnp.vdot(g, g)
    beta = 1 + norm_g2
    g_h_g = jnp.vdot(g, hg)
    norm_hg2 = jnp.vdot(hg, hg)

    # Rademacher probes, E[v vᵀ] = I: vᵀHv estimates tr H and ‖Hv‖² estimates tr H².
    probes = jax.random.rademacher(key, (num_probes, x.size), dtype=x.dtype)
    hv = jax.vmap(hvp)(probes)
    quad = jnp.sum(probes * hv, axis=1)  # vᵀ H v
    sq = jnp.sum(hv * hv, axis=1)  # ‖H v‖²
    # Two independent sets A and B: E[t_A t_B] = (tr H)², whereas the square of one
    # mean is biased upwards by its variance.
    n_a = num_probes // 2
    n_b = num_probes - n_a
    quad_a, quad_b = quad[:n_a], quad[n_a:]
    sq_a, sq_b = sq[:n_a], sq[n_a:]
    t_a, t_b = jnp.mean(quad_a), jnp.mean(quad_b)
    trace_h = jnp.mean(quad)
    trace_h_squared = t_a * t_b
    trace_h2 = jnp.mean(sq)
    s = _combine(beta, trace_h_squared, trace_h2, trace_h, g_h_g, norm_hg2)

    # Standard error. S is linear in the probe means except for the product t_A t_B:
    # S − E[S] = Σ_k y_k + (t_A − μ)(t_B − μ)/β, with independent per-probe terms
    # y_k whose coefficient of vᵀHv in set A is E[t_B]/(β n_A) − 2gᵀHg/(β² N)
    # (μ = tr H), so Var S = Σ_sets n·Var(y) + Var(t_A) Var(t_B)/β². Plugging t_B in
    # for E[t_B] inflates the expected sample variance of set A's terms by
    # Var(t_A) Var(t_B)/β² (E[t_B²] = E[t_B]² + Var(t_B)), and likewise for set B:
    # subtracting the two surplus products leaves an unbiased variance estimate.
    def per_probe(quad_set, sq_set, t_other, n_set):
        return (
            t_other / (beta * n_set) * quad_set
            - sq_set / (beta * num_probes)
            - 2 * g_h_g / (beta**2 * num_probes) * quad_set
        )

    y_a = per_probe(quad_a, sq_a, t_b, n_a)
    y_b = per_probe(quad_b, sq_b, t_a, n_b)
    var_t_a = _sample_var(quad_a) / n_a
    var_t_b = _sample_var(quad_b) / n_b
    var_s = (
        n_a * _sample_var(y_a) + n_b * _sample_var(y_b) - var_t_a * var_t_b / beta**2
    )
    var_s = jnp.maximum(var_s, 0)
    info = CurvatureInfo(
        trace_h=trace_h,
        trace_h_squared=trace_h_squared,
        trace_h2=trace_h2,
        g_h_g=g_h_g,
        norm_hg2=norm_hg2,
        norm_g=jnp.sqrt(norm_g2),
        stderr=jnp.sqrt(var_s),
        trace_h_stderr=jnp.sqrt(_sample_var(quad) / num_probes),
        trace_h2_stderr=jnp.sqrt(_sample_var(sq) / num_probes),
    )
    return s, info


def check_float_params(params) -> jnp.dtype:
    """Check that `params` is a non-empty pytree of real floating-point arrays of one
    dtype, and return that dtype."""
    leaves = jtu.tree_leaves(params)
    if not leaves:
        raise ValueError("`params` must contain at least one array; got an empty tree.")
    dtypes = set()
    for leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                "`params` must be a pytree of real floating-point arrays; it has a "
                f"leaf of dtype {jnp.dtype(dtype).name} and shape {jnp.shape(leaf)}."
            )
        dtypes.add(jnp.dtype(dtype))
    if len(dtypes) > 1:
        names = sorted(d.name for d in dtypes)
        raise TypeError(
            f"All leaves of `params` must share one dtype; got {names}. Cast them "
            "to a common floating-point dtype first."
        )
    return dtypes.pop()


def _check_loss(loss_fn, params, dtype) -> None:
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable; got {type(loss_fn).__name__}.")
    out = jax.eval_shape(loss_fn, params)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        got = jtu.tree_map(lambda x: f"{jnp.dtype(x.dtype).name}{list(x.shape)}", out)
        raise ValueError(
            "`loss_fn(params)` must return a scalar (an array of shape ()); it "
            f"returns {got}."
        )
    if out.dtype != dtype:
        raise TypeError(
            f"`loss_fn(params)` must return a real scalar of the dtype of `params` "
            f"({jnp.dtype(dtype).name}); it returns dtype {jnp.dtype(out.dtype).name}."
        )


def scalar_curvature(
    loss_fn: Callable[[PyTree[Float[Array, "..."]]], Scalar],
    params: PyTree[Float[Array, "..."]],
    *,
    method: Literal["exact", "hutchinson"] = "exact",
    num_probes: int = 64,
    key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, ""], CurvatureInfo]:
    r"""The scalar curvature of the graph of `loss_fn` at `params`.

    The graph $\{(\theta, L(\theta))\}$ of the loss is a hypersurface of
    $\mathbb{R}^{n+1}$; with $g = \nabla L(\theta)$, $H = \nabla^2 L(\theta)$ and
    $\beta = 1 + \|g\|^2$ its scalar curvature is

    $$S = \frac{(\operatorname{tr} H)^2 - \operatorname{tr}(H^2)}{\beta}
    - \frac{2\,(\operatorname{tr} H \cdot g^\mathsf{T} H g
    - g^\mathsf{T} H^2 g)}{\beta^2}.$$

    $S > 0$ where the graph is locally sphere-like (a minimum or maximum), $S < 0$
    around saddles. At a critical point ($g = 0$),
    $S = \sum_{i \neq j} \lambda_i \lambda_j$ over the eigenvalues of $H$; for two
    parameters, $S = 2 \det H / \beta^2$ (twice the Gaussian curvature).

    `method="exact"` builds $H$ densely from $n$ Hessian-vector products (small
    models). `method="hutchinson"` uses only `num_probes + 1` Hessian-vector
    products: $g^\mathsf{T} H g$ and $\|H g\|^2$ exactly, $\operatorname{tr} H$ and
    $\operatorname{tr}(H^2)$ by Hutchinson's estimator with Rademacher probes
    $v$ ($v^\mathsf{T} H v$ and $\|H v\|^2$), and $(\operatorname{tr} H)^2$ by the
    product of the trace estimates of two independent halves of the probes, so that
    the estimate of $S$ is unbiased.

    Works under `jax.jit` and `jax.vmap` (for example over `key`).

    **Arguments:**

    - `loss_fn`: $L$, a function of `params` alone returning a real scalar of the
        dtype of `params` (close over data and targets).
    - `params`: $\theta$, any pytree of real floating-point arrays sharing one dtype.
    - `method`: `"exact"` (default) or `"hutchinson"`.
    - `num_probes`: the number of Rademacher probes for `"hutchinson"` (at least 4:
        each half needs two for its variance); ignored by `"exact"`.
    - `key`: a JAX PRNG key, required for `"hutchinson"`.

    **Returns:**

    A tuple `(S, info)`: the curvature, a scalar of the dtype of `params`, and a
    [`matfree_lstsq.applications.CurvatureInfo`][] with $\operatorname{tr} H$,
    $\operatorname{tr}(H^2)$, $g^\mathsf{T} H g$, $\|H g\|^2$, $\|g\|$ and the standard
    errors of the estimates.

    **References:**

    - A. Pouplin, H. Roy, S. P. Singh and G. Arvanitidis, *On the curvature of the
        loss landscape*, arXiv:2307.04719, 2023 (the loss landscape as an embedded
        Riemannian manifold and its scalar curvature; the formula above follows from
        Gauss' equation for a graph hypersurface).
    - M. F. Hutchinson, *A stochastic estimator of the trace of the influence matrix
        for Laplacian smoothing splines*, Commun. Stat. Simul. Comput. 19(2), 1990.
    """
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}; got {method!r}.")
    dtype = check_float_params(params)
    _check_loss(loss_fn, params, dtype)
    if method == "exact":
        return _exact(loss_fn, params)
    if key is None:
        raise ValueError(
            '`method="hutchinson"` needs a PRNG `key` (e.g. `jax.random.key(0)`).'
        )
    if (
        isinstance(num_probes, bool)
        or not isinstance(num_probes, (int, np.integer))
        or num_probes < 4
    ):
        raise ValueError(
            f"`num_probes` must be an integer of at least 4; got {num_probes!r}."
        )
    return _hutchinson(loss_fn, params, key, int(num_probes))
