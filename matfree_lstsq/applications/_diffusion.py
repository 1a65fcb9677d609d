r"""Laplace diffusion: a random walk whose every step is a linearised-Laplace sample
at the current parameters, predicted with the network itself."""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, PyTree

import matfree_lstsq as mfl

from ._common import (
    as_arrays,
    check_likelihood,
    check_positive_int,
    check_positive_scalar,
    check_solver,
    normal_like,
    params_dtype,
    tree_add,
    tree_scale,
    tree_sub,
)
from ._jacobian import ggn_sqrt_operator
from ._posterior import (
    _check_num_samples,
    _sqrt_ggn_and_solver,
    laplace_sample_from_operator,
)
from ._projection import _project_lstsq


_SUBSPACES = ("full", "image", "kernel")


class DiffusionInfo(eqx.Module):
    r"""Per-step solver statistics of
    [`matfree_lstsq.applications.laplace_diffusion`][].

    Every array has shape `(S, T)`: one entry per sample and Euler–Maruyama step.
    Fields of a solve that the chosen `subspace` does not need are `None`.

    **Attributes:**

    - `laplace_num_steps`, `laplace_istop`, `laplace_residual`: the damped solve of
        the Laplace sample (`subspace="full"` and `"image"`): solver steps, SciPy's
        `istop` code, and the relative optimality $\|\nabla\|/(\|A\|\|r\|)$.
    - `projection_num_steps`, `projection_istop`, `projection_residual`: the
        undamped solve of the kernel projection (`subspace="image"` and
        `"kernel"`): solver steps, `istop`, and $\|\tilde J P v\| / (\|\tilde J\|
        \|P v\|)$.
    """

    laplace_num_steps: Int[Array, "S T"] | None
    laplace_istop: Int[Array, "S T"] | None
    laplace_residual: Float[Array, "S T"] | None
    projection_num_steps: Int[Array, "S T"] | None
    projection_istop: Int[Array, "S T"] | None
    projection_residual: Float[Array, "S T"] | None


def _diffusion_step(
    theta: PyTree[Array],
    key: PRNGKeyArray,
    *,
    model_fn: Callable,
    inputs: PyTree[Array],
    likelihood: str,
    prior_precision: Any,
    noise_std: Any,
    batch_size: int | None,
    solver: mfl.AbstractLeastSquaresSolver,
    throw: bool,
    subspace: str,
    num_steps: int,
) -> tuple[PyTree[Array], dict[str, Array]]:
    """One Euler–Maruyama step from `theta` and its solver statistics."""
    dtype = params_dtype(theta)
    sqrt_ggn = ggn_sqrt_operator(
        model_fn,
        theta,
        inputs,
        likelihood=likelihood,  # type: ignore[arg-type]
        noise_std=noise_std,
        batch_size=batch_size,
    )
    stats: dict[str, Array] = {}
    if subspace == "kernel":
        # α^{-1/2} P ε: the kernel part of a Laplace sample, without its damped solve
        # (P M^{-1} = α^{-1} P for M = J̃ᵀJ̃ + αI).
        eps = normal_like(key, theta)
        delta, proj = _project_lstsq(sqrt_ggn, eps, solver, throw)
        scale = 1 / jnp.sqrt(jnp.asarray(prior_precision, dtype))
        delta = tree_scale(scale, delta)
    else:
        delta, lap = laplace_sample_from_operator(
            key, sqrt_ggn, prior_precision, solver, throw
        )
        stats.update({f"laplace_{k}": v for k, v in lap.items()})
        proj = None
        if subspace == "image":
            kernel_part, proj = _project_lstsq(sqrt_ggn, delta, solver, throw)
            delta = tree_sub(delta, kernel_part)
    if proj is not None:
        stats.update({f"projection_{k}": v for k, v in proj.items()})
    step = 1 / jnp.sqrt(jnp.asarray(num_steps, dtype))
    return tree_add(theta, tree_scale(step, delta)), stats


@eqx.filter_jit
def _diffuse(keys, model_fn, params, inputs, prior_precision, noise_std, static):
    likelihood, subspace, num_steps, batch_size, solver, throw = static

    def one_chain(chain_keys):
        def body(theta, key):
            return _diffusion_step(
                theta,
                key,
                model_fn=model_fn,
                inputs=inputs,
                likelihood=likelihood,
                prior_precision=prior_precision,
                noise_std=noise_std,
                batch_size=batch_size,
                solver=solver,
                throw=throw,
                subspace=subspace,
                num_steps=num_steps,
            )

        return jax.lax.scan(body, params, chain_keys)

    return jax.vmap(one_chain)(keys)


def laplace_diffusion(
    key: PRNGKeyArray,
    model_fn: Callable[[PyTree[Array], Any], Float[Array, "N ..."]],
    params: PyTree[Float[ArrayLike, "..."]],
    inputs: PyTree[ArrayLike],
    num_samples: int,
    *,
    num_steps: int,
    prior_precision: Float[ArrayLike, ""],
    likelihood: Literal["regression", "classification", "binary"],
    subspace: Literal["full", "image", "kernel"] = "full",
    noise_std: Float[ArrayLike, ""] = 1.0,
    batch_size: int | None = None,
    solver: mfl.AbstractLeastSquaresSolver | None = None,
    throw: bool = False,
) -> tuple[PyTree[Array], DiffusionInfo]:
    r"""Samples of Laplace diffusion: `num_steps` Euler–Maruyama steps
    $\theta \leftarrow \theta + T^{-1/2} \Delta(\theta)$ from $\theta_0 = \hat\theta$,
    where $\Delta(\theta)$ is drawn afresh at every step from the linearised Laplace
    approximation *at the current* $\theta$, $\mathcal N(0, (G(\theta) + \alpha
    I)^{-1})$, $G = \tilde J^\mathsf{T}\tilde J$ the generalised Gauss–Newton matrix.

    Because each step follows the local geometry, the walk moves freely along
    directions that leave the training predictions unchanged (the kernel of
    $\tilde J$, re-computed at every step) and only a little across them: predicted
    with the network itself ([`matfree_lstsq.applications.sample_predict`][]), the
    samples keep the MAP's fit where sampled Laplace (one big step) underfits.
    For a model linear in its parameters, $G$ is constant and the $T$ independent
    steps sum to one exact Laplace sample; `subspace` then selects the covariance

    - `"full"`: $\Delta$ itself, covariance $(G + \alpha I)^{-1}$;
    - `"image"`: $\Delta - P\Delta$, covariance $U(\Lambda + \alpha I)^{-1}
        U^\mathsf{T}$ with $G = U\Lambda U^\mathsf{T}$, $\Lambda > 0$;
    - `"kernel"`: $\alpha^{-1/2} P\varepsilon$, $\varepsilon \sim \mathcal N(0, I)$,
        covariance $\alpha^{-1} P$ ($P\Delta$ has this law, so no damped solve is
        needed),

    where $P$ is the orthogonal projector onto $\ker \tilde J = \ker G$. (For
    `"classification"`, $\ker\tilde J$ also contains the directions that shift all
    logits of a datum equally, which the softmax ignores.)

    Cost per step and sample: one damped least-squares solve for the Laplace sample
    (by sample-then-optimise, see [`matfree_lstsq.applications.laplace_posterior`][])
    for `"full"`; that and one undamped solve for the projection for `"image"`; the
    projection alone for `"kernel"`. Samples run in parallel (`vmap`), steps in
    sequence (`lax.scan`).

    **Arguments:**

    - `key`: a JAX random key.
    - `model_fn`: `model_fn(params, inputs) -> outputs`, outputs `(N, O)` or `(N,)`.
    - `params`: the starting point $\hat\theta$, usually the MAP estimate.
    - `inputs`: the training inputs (leading data axis `N`).
    - `num_samples`: $S \ge 1$, the number of independent chains.
    - `num_steps`: $T \ge 1$, the number of Euler–Maruyama steps per chain.
    - `prior_precision`: $\alpha > 0$.
    - `likelihood`: `"regression"`, `"classification"` or `"binary"` (see
        [`matfree_lstsq.applications.ggn_sqrt_operator`][]).
    - `subspace`: `"full"` (default), `"image"` or `"kernel"`.
    - `noise_std`: $\sigma > 0$ for `"regression"`.
    - `batch_size`: stream the Jacobian over the data in batches of this size.
    - `solver`: the least-squares solver of both solves; `None` means
        `matfree_lstsq.LSMR` with tolerances $\varepsilon^{2/3}$ of the
        parameters' dtype.
    - `throw`: raise if a solve misses its tolerances (default `False`: report in
        `info`).

    **Returns:**

    `(samples, info)`: `samples` shaped like `params` with a leading axis of size
    $S$ (the end points of the chains); `info` a
    [`matfree_lstsq.applications.DiffusionInfo`][] with the statistics of every
    solve, shape `(S, T)`.

    **References:**

    H. Roy, M. Miani, C. H. Ek, P. Hennig, M. Pförtner, L. Tatzel and S. Hauberg,
    *Reparameterization invariance in approximate Bayesian inference*, NeurIPS 2024,
    arXiv:2406.03334 (Laplace diffusion). P. E. Kloeden and E. Platen, *Numerical
    solution of stochastic differential equations*, Springer, 1992 (Euler–Maruyama).
    """
    _check_num_samples(num_samples)
    check_positive_int("num_steps", num_steps)
    if subspace not in _SUBSPACES:
        raise ValueError(
            f"Unknown `subspace` {subspace!r}; expected one of {_SUBSPACES}."
        )
    check_likelihood(likelihood)
    check_positive_scalar("prior_precision", prior_precision)
    check_positive_scalar("noise_std", noise_std)
    check_positive_int("batch_size", batch_size, allow_none=True)
    check_solver(solver)
    params = as_arrays(params, "params")
    inputs = as_arrays(inputs, "inputs")
    # Builds the operator once at the start: validates the model, data and
    # likelihood, and gives the default solver's sizes.
    _, solver = _sqrt_ggn_and_solver(
        model_fn, params, inputs, likelihood, noise_std, batch_size, solver
    )
    dtype = params_dtype(params)
    keys = jax.random.split(key, (num_samples, num_steps))
    static = (likelihood, subspace, int(num_steps), batch_size, solver, bool(throw))
    samples, stats = _diffuse(
        keys,
        model_fn,
        params,
        inputs,
        jnp.asarray(prior_precision, dtype),
        jnp.asarray(noise_std, dtype),
        static,
    )
    fields = {
        f"{part}_{name}": stats.get(f"{part}_{name}")
        for part in ("laplace", "projection")
        for name in ("num_steps", "istop", "residual")
    }
    return samples, DiffusionInfo(**fields)
