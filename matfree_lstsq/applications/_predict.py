"""Predictions at parameter samples: with the model linearised at the MAP, or with
the network itself."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, Float, PyTree

from ._common import (
    as_arrays,
    check_like_params,
    check_positive_int,
    describe,
    map_batches,
    model_output,
)


def _num_samples(samples: PyTree[Array], params: PyTree[Array]) -> int:
    leaves = jtu.tree_leaves(samples)
    if not leaves or leaves[0].ndim == 0:
        raise ValueError(
            "`samples` must be a pytree shaped like `params` with a leading sample "
            f"axis; got {describe(samples)}."
        )
    num = leaves[0].shape[0]
    check_like_params(samples, params, "samples", leading=num)
    if num < 1:
        raise ValueError("`samples` holds no samples (leading dimension 0).")
    return num


@eqx.filter_jit
def _linearised(model_fn, params, samples, inputs, batch_size):
    deltas = jtu.tree_map(lambda s, p: s - p[None], samples, params)

    def one_batch(x):
        # One linearisation per batch of data, then one JVP per sample.
        out, lin = jax.linearize(lambda p: model_fn(p, x), params)
        return out[None] + jax.vmap(lin)(deltas)

    return map_batches(one_batch, inputs, batch_size, axis=1)


def linearised_predict(
    model_fn: Callable[[PyTree[Array], Any], Float[Array, "N ..."]],
    params: PyTree[Float[ArrayLike, "..."]],
    samples: PyTree[Float[ArrayLike, "S ..."]],
    inputs: PyTree[ArrayLike],
    *,
    batch_size: int | None = None,
) -> Float[Array, "S N ..."]:
    r"""Outputs of the model linearised at `params`, at each parameter sample:
    $f_{\text{lin}}(\theta_s, x) = f(\hat\theta, x) + J(x)\,(\theta_s - \hat\theta)$.

    The model is linearised once (per batch of inputs); each sample then costs one
    Jacobian-vector product. This is the predictive of linearised Laplace and of
    projected posteriors: for a sample in the kernel of the training Jacobian, the
    training predictions equal the MAP's.

    **Arguments:**

    - `model_fn`: `model_fn(params, inputs) -> outputs`, outputs `(N, O)` or `(N,)`.
    - `params`: the point of linearisation $\hat\theta$ (a pytree).
    - `samples`: parameter samples $\theta_s$, shaped like `params` with a leading
        sample axis of size `S` on every leaf.
    - `inputs`: the inputs to predict at (leading data axis `N`).
    - `batch_size`: if given, predict one batch of inputs at a time.

    **Returns:**

    An array of shape `(S, N, O)` (or `(S, N)`).
    """
    check_positive_int("batch_size", batch_size, allow_none=True)
    params = as_arrays(params, "params")
    inputs = as_arrays(inputs, "inputs")
    samples = as_arrays(samples, "samples")
    model_output(model_fn, params, inputs)
    _num_samples(samples, params)
    return _linearised(model_fn, params, samples, inputs, batch_size)


@eqx.filter_jit
def _sampled(model_fn, samples, inputs, batch_size):
    def one_batch(x):
        return jax.vmap(lambda p: model_fn(p, x))(samples)

    return map_batches(one_batch, inputs, batch_size, axis=1)


def sample_predict(
    model_fn: Callable[[PyTree[Array], Any], Float[Array, "N ..."]],
    samples: PyTree[Float[ArrayLike, "S ..."]],
    inputs: PyTree[ArrayLike],
    *,
    batch_size: int | None = None,
) -> Float[Array, "S N ..."]:
    r"""Outputs of the network itself at each parameter sample, $f(\theta_s, x)$.

    **Arguments:**

    - `model_fn`: `model_fn(params, inputs) -> outputs`, outputs `(N, O)` or `(N,)`.
    - `samples`: parameter samples, a pytree with a leading sample axis of size `S`
        on every leaf.
    - `inputs`: the inputs to predict at (leading data axis `N`).
    - `batch_size`: if given, predict one batch of inputs at a time.

    **Returns:**

    An array of shape `(S, N, O)` (or `(S, N)`).
    """
    check_positive_int("batch_size", batch_size, allow_none=True)
    samples = as_arrays(samples, "samples")
    inputs = as_arrays(inputs, "inputs")
    leaves = jtu.tree_leaves(samples)
    if not leaves or any(leaf.ndim == 0 for leaf in leaves):
        raise ValueError(
            "`samples` must be a pytree of arrays with a leading sample axis; got "
            f"{describe(samples)}."
        )
    sizes = {leaf.shape[0] for leaf in leaves}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(
            "Every leaf of `samples` must have the same, non-zero leading (sample) "
            f"dimension; got {describe(samples)}."
        )
    first = jtu.tree_map(lambda s: s[0], samples)
    model_output(model_fn, first, inputs)
    return _sampled(model_fn, samples, inputs, batch_size)
