r"""Posterior samples from least-squares solves: projected (null-space) posteriors
and linearised Laplace by sample-then-optimise."""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree

import matfree_lstsq as mfl

from ._common import (
    as_arrays,
    check_likelihood,
    check_positive_scalar,
    check_solver,
    default_solver,
    normal_like,
    params_dtype,
    relative_residual,
    tree_add,
    tree_scale,
    tree_size,
    tree_sub,
    tree_vdot,
)
from ._jacobian import ggn_sqrt_operator
from ._projection import kernel_projector


def _check_num_samples(num_samples: Any) -> None:
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, int)
        or num_samples < 1
    ):
        raise ValueError(
            f"`num_samples` must be an int of at least 1; got {num_samples!r}."
        )


def _add_to_each(params: PyTree[Array], perturbations: PyTree[Array]) -> PyTree:
    return jtu.tree_map(lambda p, d: p[None] + d, params, perturbations)


# ---------------------------------------------------------------------------------
# Projected posterior.
# ---------------------------------------------------------------------------------


@eqx.filter_jit
def _projected_samples(projector, params, eps, prior_precision):
    projected, info = projector.project(eps)
    num_params = tree_size(params)
    dtype = params_dtype(params)
    # Hutchinson: E[εᵀ P ε] = tr P = D − rank, from the samples' own noise.
    quad = jax.vmap(tree_vdot)(eps, projected)
    rank_samples = num_params - quad
    rank = jnp.mean(rank_samples)
    num = rank_samples.shape[0]
    if num > 1:
        rank_stderr = jnp.std(rank_samples, ddof=1) / jnp.sqrt(jnp.asarray(num, dtype))
    else:
        rank_stderr = jnp.asarray(jnp.nan, dtype)
    if prior_precision is None:
        # The evidence maximiser in the high-precision limit: rank / ‖θ̂‖².
        alpha = rank / tree_vdot(params, params)
    else:
        alpha = jnp.asarray(prior_precision, dtype)
    scale = 1 / jnp.sqrt(alpha)
    samples = _add_to_each(params, tree_scale(scale, projected))
    info = dict(
        prior_precision=alpha, rank=rank, rank_stderr=rank_stderr, projection=info
    )
    return samples, info


def projected_posterior(
    key: PRNGKeyArray,
    model_fn: Callable[[PyTree[Array], Any], Float[Array, "N ..."]],
    params: PyTree[Float[ArrayLike, "..."]],
    inputs: PyTree[ArrayLike],
    num_samples: int,
    *,
    prior_precision: Float[ArrayLike, ""] | None = None,
    method: Literal["lstsq", "alternating", "dense"] = "lstsq",
    kind: Literal["jacobian", "loss"] = "jacobian",
    loss_fn: Callable[[Array, Any], Float[Array, " N"]] | None = None,
    targets: PyTree[ArrayLike] | None = None,
    batch_size: int | None = None,
    num_sweeps: int = 20,
    tol: float | None = None,
    acceleration: bool = True,
    solver: mfl.AbstractLeastSquaresSolver | None = None,
    throw: bool = False,
) -> tuple[PyTree[Array], dict[str, Any]]:
    r"""Samples of the projected ("null-space") posterior
    $\theta_s = \hat\theta + \alpha^{-1/2} P \varepsilon_s$,
    $\varepsilon_s \sim \mathcal N(0, I)$, with $P$ the projector onto the kernel of
    the model's Jacobian over the training data.

    Predicted with the linearised model
    ([`matfree_lstsq.applications.linearised_predict`][]), every sample reproduces
    the MAP's training predictions (up to the solver's tolerance): the posterior
    cannot underfit. Away from the data the samples spread with the prior.

    The prior precision defaults to the maximiser of the evidence in the
    high-precision limit, $\alpha = r / \|\hat\theta\|^2$, where the rank
    $r = D - \operatorname{tr} P$ of the Jacobian is estimated by Hutchinson's
    estimator from the samples' own noise, $\operatorname{tr} P \approx \frac1S
    \sum_s \varepsilon_s^\mathsf{T} P \varepsilon_s$ ($D$ the number of
    parameters).

    **Arguments:**

    - `key`: a JAX random key.
    - `model_fn`: `model_fn(params, inputs) -> outputs`, outputs `(N, O)` or `(N,)`.
    - `params`: the MAP estimate $\hat\theta$ (any pytree of floating arrays).
    - `inputs`: the training inputs (leading data axis `N`).
    - `num_samples`: $S \ge 1$.
    - `prior_precision`: $\alpha > 0$, or `None` for the evidence-based choice.
    - `method`, `kind`, `loss_fn`, `targets`, `batch_size`, `num_sweeps`, `tol`,
        `acceleration`, `solver`, `throw`: how to project; see
        [`matfree_lstsq.applications.kernel_projector`][].

    **Returns:**

    `(samples, info)`: `samples` shaped like `params` with a leading axis of size
    $S$; `info` a dictionary with `prior_precision` ($\alpha$ used), `rank` (the
    Hutchinson estimate of $r$), `rank_stderr` (its standard error; NaN for
    $S = 1$) and `projection` (the projector's per-sample diagnostics, e.g. the
    solver's `residual`, see [`matfree_lstsq.applications.KernelProjector`][]).

    **References:**

    M. Miani, H. Roy and S. Hauberg, *Bayes without underfitting: fully
    correlated deep learning posteriors via alternating projections*, AISTATS 2025,
    arXiv:2410.16901.
    D. J. C. MacKay, *Bayesian interpolation*, Neural Computation 4(3), 1992
    (evidence). M. F. Hutchinson, *A stochastic estimator of the trace of the
    influence matrix*, 1990.
    """
    _check_num_samples(num_samples)
    if prior_precision is not None:
        check_positive_scalar("prior_precision", prior_precision)
    params = as_arrays(params, "params")
    projector = kernel_projector(
        model_fn,
        params,
        inputs,
        method=method,
        kind=kind,
        loss_fn=loss_fn,
        targets=targets,
        batch_size=batch_size,
        num_sweeps=num_sweeps,
        tol=tol,
        acceleration=acceleration,
        solver=solver,
        throw=throw,
    )
    eps = normal_like(key, params, (num_samples,))
    return _projected_samples(projector, params, eps, prior_precision)


# ---------------------------------------------------------------------------------
# Linearised Laplace by sample-then-optimise.
# ---------------------------------------------------------------------------------


def laplace_sample_from_operator(
    key: PRNGKeyArray,
    sqrt_ggn: lx.AbstractLinearOperator,
    prior_precision: Float[ArrayLike, ""],
    solver: mfl.AbstractLeastSquaresSolver,
    throw: bool = False,
) -> tuple[PyTree[Array], dict[str, Array]]:
    r"""One exact draw $x \sim \mathcal N(0, (\tilde J^\mathsf{T}\tilde J +
    \alpha I)^{-1})$ by one damped least-squares solve (see `_laplace_solve`)."""
    # One draw for both (a single random kernel compiles faster than one per leaf).
    eps1, eps2 = normal_like(key, (sqrt_ggn.out_structure(), sqrt_ggn.in_structure()))
    return _laplace_solve(eps1, eps2, sqrt_ggn, prior_precision, solver, throw)


def _laplace_solve(eps1, eps2, sqrt_ggn, prior_precision, solver, throw):
    r"""The perturbation $x$ for given standard normal $\varepsilon_1$ (output
    space) and $\varepsilon_2$ (parameter space).

    $y = \arg\min_y \|\tilde J y - (\varepsilon_1 - \tilde J \varepsilon_2 /
    \sqrt\alpha)\|^2 + \alpha \|y\|^2$ and $x = y + \varepsilon_2/\sqrt\alpha$.
    Then $x = M^{-1}(\tilde J^\mathsf{T}\varepsilon_1 + \sqrt\alpha\,
    \varepsilon_2)$ with $M = \tilde J^\mathsf{T}\tilde J + \alpha I$, whose
    covariance is $M^{-1} M M^{-1} = M^{-1}$.
    """
    dtype = params_dtype(eps2)
    sqrt_alpha = jnp.sqrt(jnp.asarray(prior_precision, dtype))
    shift = tree_scale(1 / sqrt_alpha, eps2)
    rhs = tree_sub(eps1, sqrt_ggn.mv(shift))
    sol = mfl.lstsq(sqrt_ggn, rhs, solver, damp=sqrt_alpha, throw=throw)
    stats = dict(
        num_steps=sol.stats["num_steps"],
        istop=sol.stats["istop"],
        residual=relative_residual(sol.stats),
    )
    return tree_add(sol.value, shift), stats


def _laplace_sample(
    key: PRNGKeyArray,
    model_fn: Callable,
    params: PyTree[Array],
    inputs: PyTree[Array],
    *,
    likelihood: str,
    prior_precision: Float[ArrayLike, ""],
    noise_std: Float[ArrayLike, ""] = 1.0,
    batch_size: int | None = None,
    solver: mfl.AbstractLeastSquaresSolver | None = None,
    throw: bool = False,
) -> tuple[PyTree[Array], dict[str, Array]]:
    """One linearised-Laplace perturbation at `params` (not added to `params`) and
    the solver's statistics: the step Laplace diffusion takes at every iterate."""
    sqrt_ggn, solver = _sqrt_ggn_and_solver(
        model_fn, params, inputs, likelihood, noise_std, batch_size, solver
    )
    return laplace_sample_from_operator(key, sqrt_ggn, prior_precision, solver, throw)


def _sqrt_ggn_and_solver(
    model_fn, params, inputs, likelihood, noise_std, batch_size, solver
) -> tuple[lx.AbstractLinearOperator, mfl.AbstractLeastSquaresSolver]:
    """The GGN square root at `params` (which validates the model, the data and the
    likelihood) and the given solver, or the default one for the operator's sizes
    and dtype."""
    sqrt_ggn = ggn_sqrt_operator(
        model_fn,
        params,
        inputs,
        likelihood=likelihood,
        noise_std=noise_std,
        batch_size=batch_size,
    )
    if solver is None:
        in_struct = sqrt_ggn.in_structure()
        m, n = tree_size(sqrt_ggn.out_structure()), tree_size(in_struct)
        solver = default_solver(params_dtype(in_struct), m, n)
    return sqrt_ggn, solver


@eqx.filter_jit
def _laplace_samples(key, num_samples, sqrt_ggn, prior_precision, solver, throw):
    # All noise in one draw outside the vectorised solve: one random kernel.
    structs = (sqrt_ggn.out_structure(), sqrt_ggn.in_structure())
    eps1, eps2 = normal_like(key, structs, (num_samples,))
    return jax.vmap(
        lambda e1, e2: _laplace_solve(e1, e2, sqrt_ggn, prior_precision, solver, throw)
    )(eps1, eps2)


def laplace_posterior(
    key: PRNGKeyArray,
    model_fn: Callable[[PyTree[Array], Any], Float[Array, "N ..."]],
    params: PyTree[Float[ArrayLike, "..."]],
    inputs: PyTree[ArrayLike],
    num_samples: int,
    *,
    likelihood: Literal["regression", "classification", "binary"],
    prior_precision: Float[ArrayLike, ""],
    noise_std: Float[ArrayLike, ""] = 1.0,
    batch_size: int | None = None,
    solver: mfl.AbstractLeastSquaresSolver | None = None,
    throw: bool = False,
) -> tuple[PyTree[Array], dict[str, Array]]:
    r"""Exact samples of the linearised Laplace posterior
    $\mathcal N(\hat\theta, (G + \alpha I)^{-1})$, $G = J^\mathsf{T} H J$ the
    generalised Gauss–Newton matrix, by sample-then-optimise.

    Each sample is one damped least-squares solve with the GGN's square root
    $\tilde J$ ([`matfree_lstsq.applications.ggn_sqrt_operator`][]):
    $y = \arg\min_y \|\tilde J y - (\varepsilon_1 - \tilde J\varepsilon_2/\sqrt\alpha)
    \|^2 + \alpha\|y\|^2$, $\theta_s = \hat\theta + y + \varepsilon_2/\sqrt\alpha$
    with $\varepsilon_1, \varepsilon_2$ standard normal. Neither $G$ nor its
    Cholesky factor is formed, and no Lanczos decomposition is needed; the samples are
    exact up to the solver's tolerance.

    **Arguments:**

    - `key`: a JAX random key.
    - `model_fn`: `model_fn(params, inputs) -> outputs`, outputs `(N, O)` or `(N,)`.
    - `params`: the MAP estimate $\hat\theta$.
    - `inputs`: the training inputs (leading data axis `N`).
    - `num_samples`: $S \ge 1$.
    - `likelihood`: `"regression"`, `"classification"` or `"binary"`.
    - `prior_precision`: $\alpha > 0$.
    - `noise_std`: $\sigma > 0$ for `"regression"`.
    - `batch_size`: stream the Jacobian over the data in batches of this size.
    - `solver`: the least-squares solver; `None` means `matfree_lstsq.LSMR` with
        tolerances $\varepsilon^{2/3}$ of the parameters' dtype.
    - `throw`: raise if a solve misses its tolerances (default `False`: report).

    **Returns:**

    `(samples, info)`: `samples` shaped like `params` with a leading axis of size
    $S$; `info` with per-sample `num_steps`, `istop` and `residual` (the solver's
    relative optimality $\|\nabla\|/(\|A\|\|r\|)$ of the damped problem).

    **References:**

    G. Papandreou and A. L. Yuille, *Gaussian sampling by local perturbations*,
    NeurIPS 2010. J. A. Lin et al., *Sampling from Gaussian process posteriors using
    stochastic gradient descent*, NeurIPS 2023. D. J. C. MacKay, *A practical
    Bayesian framework for backpropagation networks*, Neural Computation 4(3), 1992.
    """
    _check_num_samples(num_samples)
    check_likelihood(likelihood)
    check_positive_scalar("prior_precision", prior_precision)
    check_solver(solver)
    params = as_arrays(params, "params")
    sqrt_ggn, solver = _sqrt_ggn_and_solver(
        model_fn, params, inputs, likelihood, noise_std, batch_size, solver
    )
    deltas, info = _laplace_samples(
        key, num_samples, sqrt_ggn, prior_precision, solver, throw
    )
    return _add_to_each(params, deltas), info
