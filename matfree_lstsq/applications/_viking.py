r"""VIKING: variational inference with a Gaussian whose covariance splits parameter
space into the kernel of the Jacobian at the mean and its orthogonal complement."""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree

import matfree_lstsq as mfl

from ._common import (
    as_arrays,
    check_positive_int,
    check_positive_scalar,
    check_solver,
    describe,
    normal_like,
    num_data,
    params_dtype,
    tree_size,
    tree_vdot,
)
from ._posterior import _check_num_samples
from ._projection import KernelProjector, kernel_projector


_KERNELS = ("jacobian", "loss")


def _check_log_scalar(name: str, value: Any) -> None:
    """A real floating scalar, finite when it is concrete."""
    if isinstance(value, Tracer):
        if jnp.shape(value) != ():
            raise ValueError(f"`{name}` must be a scalar; got shape {value.shape}.")
        return
    arr = np.asarray(value)
    if arr.shape != () or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(
            f"`{name}` must be a real floating-point scalar; got {value!r} "
            f"(shape {arr.shape}, dtype {arr.dtype})."
        )
    if not np.isfinite(arr):
        raise ValueError(f"`{name}` must be finite; got {value!r}.")


class VikingPosterior(eqx.Module):
    r"""The VIKING variational family
    $q(\theta) = \mathcal N\big(\hat\theta,\; \alpha^{-1} P + \sigma_{\text{im}}^2
    (I - P)\big)$, with $P$ the orthogonal projector onto the kernel of the
    Jacobian at the mean $\hat\theta$ (of the model's outputs, or of the per-datum
    losses), and $\alpha$ the precision of the prior $\mathcal N(0, \alpha^{-1} I)$.

    Along the kernel, directions the training data cannot see, $q$ follows the
    prior; across it, its spread is the learned $\sigma_{\text{im}}$. All fields
    are trainable (e.g. with optax, through
    [`matfree_lstsq.applications.viking_elbo`][]); the scales are stored as
    logarithms, so every value is valid.

    **Arguments and attributes:**

    - `mean`: the mean $\hat\theta$, a pytree of floating arrays of one dtype.
    - `log_precision`: $\log\alpha$, a real scalar (cast to the mean's dtype).
    - `log_scale_image`: $\log\sigma_{\text{im}}$, a real scalar (cast likewise).
    - `kernel`: `"jacobian"` (default: the kernel of the model's Jacobian over all
        outputs) or `"loss"` (the kernel of the Jacobian of the per-datum losses,
        which is larger: it keeps every loss, not every output, fixed). A static
        field.

    Build it from positive scales with
    [`VikingPosterior.from_scales`][matfree_lstsq.applications.VikingPosterior.from_scales].

    **References:**

    S. G. Fadel, H. Roy, N. Krämer, Y. Zainchkovskyy, S. Syrota, A. Valverde Mahou,
    C. H. Ek and S. Hauberg, *VIKING: Deep variational inference with stochastic
    projections*, NeurIPS 2025, arXiv:2510.23684.
    """

    mean: PyTree[Array]
    log_precision: Float[Array, ""]
    log_scale_image: Float[Array, ""]
    kernel: str = eqx.field(static=True)

    def __init__(
        self,
        mean: PyTree[Float[ArrayLike, "..."]],
        log_precision: Float[ArrayLike, ""],
        log_scale_image: Float[ArrayLike, ""],
        kernel: Literal["jacobian", "loss"] = "jacobian",
    ):
        self.mean = as_arrays(mean, "mean")
        dtype = params_dtype(self.mean)
        _check_log_scalar("log_precision", log_precision)
        _check_log_scalar("log_scale_image", log_scale_image)
        self.log_precision = jnp.asarray(log_precision).astype(dtype)
        self.log_scale_image = jnp.asarray(log_scale_image).astype(dtype)
        self.kernel = kernel

    def __check_init__(self):
        if self.kernel not in _KERNELS:
            raise ValueError(
                f"Unknown `kernel` {self.kernel!r}; expected one of {_KERNELS}."
            )

    @classmethod
    def from_scales(
        cls,
        mean: PyTree[Float[ArrayLike, "..."]],
        *,
        prior_precision: Float[ArrayLike, ""],
        scale_image: Float[ArrayLike, ""],
        kernel: Literal["jacobian", "loss"] = "jacobian",
    ) -> "VikingPosterior":
        r"""A posterior from $\alpha > 0$ and $\sigma_{\text{im}} > 0$ (a
        `ValueError` for non-positive values).

        **Arguments:**

        - `mean`: the mean $\hat\theta$.
        - `prior_precision`: $\alpha > 0$.
        - `scale_image`: $\sigma_{\text{im}} > 0$.
        - `kernel`: `"jacobian"` or `"loss"`.

        **Returns:**

        A [`matfree_lstsq.applications.VikingPosterior`][].
        """
        check_positive_scalar("prior_precision", prior_precision)
        check_positive_scalar("scale_image", scale_image)
        mean = as_arrays(mean, "mean")
        dtype = params_dtype(mean)
        return cls(
            mean,
            jnp.log(jnp.asarray(prior_precision).astype(dtype)),
            jnp.log(jnp.asarray(scale_image).astype(dtype)),
            kernel,
        )

    @property
    def prior_precision(self) -> Float[Array, ""]:
        r"""$\alpha = \exp(\texttt{log\_precision})$."""
        return jnp.exp(self.log_precision)

    @property
    def scale_image(self) -> Float[Array, ""]:
        r"""$\sigma_{\text{im}} = \exp(\texttt{log\_scale\_image})$."""
        return jnp.exp(self.log_scale_image)

    def kl_divergence(self, kernel_dim: Float[ArrayLike, ""]) -> Float[Array, ""]:
        r"""$\mathrm{KL}(q \,\|\, \mathcal N(0, \alpha^{-1} I))$ in closed form, for
        a kernel of dimension $R = \operatorname{tr} P$:

        $$\tfrac12\big[R + \alpha (D - R)\sigma_{\text{im}}^2 - D
        + \alpha\|\hat\theta\|^2 - D\log\alpha + R\log\alpha
        - 2(D - R)\log\sigma_{\text{im}}\big],$$

        $D$ the number of parameters. (The covariance has eigenvalue $\alpha^{-1}$
        with multiplicity $R$ and $\sigma_{\text{im}}^2$ with multiplicity $D - R$.)

        **Arguments:**

        - `kernel_dim`: $R \in [0, D]$, e.g. `info.kernel_dim` of
            [`matfree_lstsq.applications.viking_elbo`][].

        **Returns:**

        The KL divergence, a scalar.
        """
        dtype = params_dtype(self.mean)
        d = jnp.asarray(tree_size(self.mean), dtype)
        r = jnp.asarray(kernel_dim).astype(dtype)
        log_a, log_s = self.log_precision, self.log_scale_image
        alpha = jnp.exp(log_a)
        sq_norm = tree_vdot(self.mean, self.mean)
        return 0.5 * (
            r
            + alpha * (d - r) * jnp.exp(2 * log_s)
            - d
            + alpha * sq_norm
            - d * log_a
            + r * log_a
            - 2 * (d - r) * log_s
        )


class VikingInfo(eqx.Module):
    r"""Diagnostics of [`matfree_lstsq.applications.viking_elbo`][] (and of
    [`matfree_lstsq.applications.viking_sample`][], where `expected_nll` and `kl`
    are `None`).

    **Attributes:**

    - `expected_nll`: the Monte-Carlo estimate of
        $\mathbb E_q[\sum_n \ell_n(\theta)]$ over the given data.
    - `kl`: $\mathrm{KL}(q \,\|\, p)$ in closed form, at `kernel_dim`.
    - `kernel_dim`: the Hutchinson estimate $\hat R = \frac1S\sum_s
        \varepsilon_s^\mathsf{T} P \varepsilon_s$ of $R = \operatorname{tr} P$ from
        the samples' own noise, clipped to $[0, D]$.
    - `kernel_dim_stderr`: its standard error (NaN for one sample).
    - `projection_residual`: per sample, the relative optimality $\|J P\varepsilon\|
        / (\|J\| \|P\varepsilon\|)$ reported by the projection's solver.
    """

    expected_nll: Float[Array, ""] | None
    kl: Float[Array, ""] | None
    kernel_dim: Float[Array, ""]
    kernel_dim_stderr: Float[Array, ""]
    projection_residual: Float[Array, " S"]


def _projector(
    posterior, model_fn, inputs, loss_fn, targets, batch_size, solver, throw
) -> KernelProjector:
    kind = posterior.kernel
    return kernel_projector(
        model_fn,
        posterior.mean,
        inputs,
        method="lstsq",
        kind=kind,
        loss_fn=loss_fn if kind == "loss" else None,
        targets=targets if kind == "loss" else None,
        batch_size=batch_size,
        solver=solver,
        throw=throw,
    )


def _draw(
    posterior: VikingPosterior,
    key: PRNGKeyArray,
    projector: KernelProjector,
    num_samples: int,
) -> tuple[PyTree[Array], Array, Array, Array]:
    r"""Samples $\hat\theta + \sigma\varepsilon + (\alpha^{-1/2} - \sigma)
    P\varepsilon$: covariance $(a P + \sigma(I - P))^2 = a^2 P + \sigma^2 (I -
    P)$ with $a = \alpha^{-1/2}$, from one projection per sample."""
    mean = posterior.mean
    eps = normal_like(key, mean, (num_samples,))
    p_eps, proj = projector.project(eps)
    a = jnp.exp(-0.5 * posterior.log_precision)
    s = jnp.exp(posterior.log_scale_image)
    samples = jtu.tree_map(
        lambda m, e, pe: m[None] + s * e + (a - s) * pe, mean, eps, p_eps
    )
    dtype = params_dtype(mean)
    d = tree_size(mean)
    quad = jax.vmap(tree_vdot)(eps, p_eps)
    # tr P is locally constant in the mean (the rank of J is), so its exact
    # derivative is zero; the estimator's own derivative would only add noise.
    quad = jax.lax.stop_gradient(quad)
    kernel_dim = jnp.clip(jnp.mean(quad), 0, d)
    if num_samples > 1:
        stderr = jnp.std(quad, ddof=1) / jnp.sqrt(jnp.asarray(num_samples, dtype))
    else:
        stderr = jnp.asarray(jnp.nan, dtype)
    return samples, kernel_dim, stderr, proj["residual"]


def _check_posterior(posterior: Any) -> None:
    if not isinstance(posterior, VikingPosterior):
        raise ValueError(
            f"`posterior` must be a `VikingPosterior`; got {type(posterior).__name__}."
        )


def viking_elbo(
    posterior: VikingPosterior,
    key: PRNGKeyArray,
    model_fn: Callable[[PyTree[Array], Any], Float[Array, "N ..."]],
    loss_fn: Callable[[Array, Any], Float[Array, " N"]],
    inputs: PyTree[ArrayLike],
    targets: PyTree[ArrayLike],
    *,
    num_samples: int,
    beta: Float[ArrayLike, ""],
    batch_size: int | None = None,
    solver: mfl.AbstractLeastSquaresSolver | None = None,
    throw: bool = False,
) -> tuple[Float[Array, ""], VikingInfo]:
    r"""The negative evidence lower bound of VIKING on a batch of data,
    $\mathbb E_{q}\big[\sum_n \ell_n(\theta)\big] + \beta\,\mathrm{KL}(q\,\|\,p)$,
    with $\ell_n = \texttt{loss\_fn}(f(\theta, x_n), y_n)$ the per-datum negative
    log-likelihood and $p = \mathcal N(0, \alpha^{-1} I)$.

    The expectation is a Monte-Carlo average over `num_samples` reparametrised
    draws $\theta_s = \hat\theta + \sigma_{\text{im}}\varepsilon_s +
    (\alpha^{-1/2} - \sigma_{\text{im}}) P\varepsilon_s$ (one kernel projection per
    draw, [`matfree_lstsq.applications.kernel_projector`][] with `method="lstsq"`,
    over the given data), predicted with the network itself. The KL is the closed
    form of `VikingPosterior.kl_divergence`
    at the Hutchinson estimate $\hat R$ of $\operatorname{tr} P$.

    Gradients: with respect to the mean they flow through the projection $P$
    (the derivative rules of [`matfree_lstsq.lstsq`][]) and through the KL's
    $\alpha\|\hat\theta\|^2$; $\hat R$ is held fixed (the rank is locally
    constant, so $\partial_{\hat\theta} \operatorname{tr} P = 0$). With respect to
    $\log\alpha$ and $\log\sigma_{\text{im}}$ they flow through the samples and
    the closed-form KL.

    Minibatch training: call it on each batch with `beta` divided by the number of
    batches, so that one epoch sums to the full-data bound (the kernel is then that
    of the batch's Jacobian). Differentiate with `equinox.filter_value_and_grad`
    and update with optax.

    **Arguments:**

    - `posterior`: a [`matfree_lstsq.applications.VikingPosterior`][].
    - `key`: a JAX random key.
    - `model_fn`: `model_fn(params, inputs) -> outputs`, outputs `(N, O)` or `(N,)`.
    - `loss_fn`: `loss_fn(outputs, targets) -> losses` of shape `(N,)`, the
        per-datum negative log-likelihoods.
    - `inputs`, `targets`: the (batch of) data, leading data axis `N`.
    - `num_samples`: $S \ge 1$ Monte-Carlo samples.
    - `beta`: $\beta \ge 0$, the weight of the KL term.
    - `batch_size`: stream the projection's Jacobian over the data in batches.
    - `solver`: the projection's least-squares solver (default: LSMR with
        tolerances $\varepsilon^{2/3}$).
    - `throw`: raise if a projection misses its tolerances (default `False`).

    **Returns:**

    `(loss, info)`: the scalar loss and a
    [`matfree_lstsq.applications.VikingInfo`][] with the expected NLL, the KL and
    the kernel-dimension estimate.

    **References:**

    S. G. Fadel et al., *VIKING: Deep variational inference with stochastic
    projections*, NeurIPS 2025, arXiv:2510.23684. D. P. Kingma and M. Welling,
    *Auto-encoding variational Bayes*, ICLR 2014 (reparametrisation).
    """
    _check_posterior(posterior)
    _check_num_samples(num_samples)
    check_positive_scalar("beta", beta, allow_zero=True)
    check_positive_int("batch_size", batch_size, allow_none=True)
    check_solver(solver)
    if not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be callable; got {type(loss_fn).__name__}.")
    inputs = as_arrays(inputs, "inputs")
    targets = as_arrays(targets, "targets")
    n = num_data(inputs)
    if num_data(targets, "targets") != n:
        raise ValueError(
            f"`targets` must have the leading data dimension of `inputs` ({n}); got "
            f"{describe(targets)}."
        )
    projector = _projector(
        posterior, model_fn, inputs, loss_fn, targets, batch_size, solver, throw
    )
    samples, kernel_dim, stderr, residual = _draw(
        posterior, key, projector, num_samples
    )
    dtype = params_dtype(posterior.mean)

    def nll(theta):
        losses = loss_fn(model_fn(theta, inputs), targets)
        if jnp.shape(losses) != (n,) or jnp.dtype(losses.dtype) != dtype:
            raise ValueError(
                f"`loss_fn(outputs, targets)` must return per-datum losses of shape "
                f"({n},) and dtype {dtype.name}; got {describe(losses)}."
            )
        return jnp.sum(losses)

    expected_nll = jnp.mean(jax.vmap(nll)(samples))
    kl = posterior.kl_divergence(kernel_dim)
    loss = expected_nll + jnp.asarray(beta).astype(dtype) * kl
    info = VikingInfo(
        expected_nll=expected_nll,
        kl=kl,
        kernel_dim=kernel_dim,
        kernel_dim_stderr=stderr,
        projection_residual=residual,
    )
    return loss, info


def viking_sample(
    posterior: VikingPosterior,
    key: PRNGKeyArray,
    model_fn: Callable[[PyTree[Array], Any], Float[Array, "N ..."]],
    inputs: PyTree[ArrayLike],
    num_samples: int,
    *,
    loss_fn: Callable[[Array, Any], Float[Array, " N"]] | None = None,
    targets: PyTree[ArrayLike] | None = None,
    batch_size: int | None = None,
    solver: mfl.AbstractLeastSquaresSolver | None = None,
    throw: bool = False,
) -> tuple[PyTree[Array], VikingInfo]:
    r"""Samples of a VIKING posterior
    $\theta_s \sim \mathcal N(\hat\theta, \alpha^{-1}P + \sigma_{\text{im}}^2
    (I - P))$, $P$ the kernel projector at the mean over `inputs` (the training
    data), one least-squares projection per sample. Predict with the network
    itself, [`matfree_lstsq.applications.sample_predict`][].

    **Arguments:**

    - `posterior`: a [`matfree_lstsq.applications.VikingPosterior`][].
    - `key`: a JAX random key.
    - `model_fn`: `model_fn(params, inputs) -> outputs`.
    - `inputs`: the training inputs that define the kernel (leading axis `N`).
    - `num_samples`: $S \ge 1$.
    - `loss_fn`, `targets`: needed only for `posterior.kernel == "loss"`.
    - `batch_size`, `solver`, `throw`: as for
        [`matfree_lstsq.applications.viking_elbo`][].

    **Returns:**

    `(samples, info)`: `samples` shaped like the mean with a leading axis of size
    $S$, and a [`matfree_lstsq.applications.VikingInfo`][] (without `expected_nll`
    and `kl`).
    """
    _check_posterior(posterior)
    _check_num_samples(num_samples)
    check_positive_int("batch_size", batch_size, allow_none=True)
    check_solver(solver)
    if posterior.kernel == "loss" and (loss_fn is None or targets is None):
        raise ValueError(
            "A posterior with `kernel='loss'` needs `loss_fn` and `targets` to sample."
        )
    projector = _projector(
        posterior, model_fn, inputs, loss_fn, targets, batch_size, solver, throw
    )
    samples, kernel_dim, stderr, residual = _sample_jit(
        posterior, key, projector, num_samples
    )
    info = VikingInfo(
        expected_nll=None,
        kl=None,
        kernel_dim=kernel_dim,
        kernel_dim_stderr=stderr,
        projection_residual=residual,
    )
    return samples, info


_sample_jit = eqx.filter_jit(_draw)
