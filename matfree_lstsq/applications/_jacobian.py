r"""Jacobians of a model over a data set, and the square root of its generalised
Gauss–Newton matrix, as lineax operators.

A model is `model_fn(params, inputs) -> outputs`: `params` any pytree of arrays,
`inputs` batched along a leading data axis, `outputs` of shape `(N, O)` or `(N,)`.
"""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike, Float, PyTree

from ._common import (
    as_arrays,
    batch_data,
    check_likelihood,
    check_positive_int,
    check_positive_scalar,
    map_batches,
    model_output,
    num_data,
    unbatch,
)


# ---------------------------------------------------------------------------------
# The functions whose Jacobians we take: f(params, data) with `data` a tuple of
# arrays that share a leading data axis.
# ---------------------------------------------------------------------------------


class ModelOutputs(eqx.Module):
    """`data = (inputs,)` ↦ `model_fn(params, inputs)`."""

    model_fn: Callable

    def __call__(self, params: PyTree[Array], data: tuple) -> Array:
        return self.model_fn(params, data[0])


class LossOutputs(eqx.Module):
    """`data = (inputs, targets)` ↦ per-datum losses
    `loss_fn(model_fn(params, inputs), targets)`."""

    model_fn: Callable
    loss_fn: Callable

    def __call__(self, params: PyTree[Array], data: tuple) -> Array:
        inputs, targets = data
        return self.loss_fn(self.model_fn(params, inputs), targets)


class _StreamedJVP(eqx.Module):
    """$v \\mapsto J v$ computed batch by batch over the data.

    Each batch's Jacobian-vector product sits inside `jax.checkpoint`: when the
    solver transposes this function (for $J^\\mathsf{T} u$), the forward pass is
    recomputed one batch at a time instead of storing activations for all data.
    """

    fn: Callable
    params: PyTree[Array]
    data: tuple  # leaves (num_batches, batch_size, ...)
    num_data: int = eqx.field(static=True)

    def __call__(self, tangent: PyTree[Array]) -> Array:
        params = self.params
        fn = self.fn

        @jax.checkpoint
        def one_batch(batch):
            return jax.jvp(lambda p: fn(p, batch), (params,), (tangent,))[1]

        return unbatch(jax.lax.map(one_batch, self.data), self.num_data)


def data_jacobian(
    fn: Callable,
    params: PyTree[Array],
    data: tuple,
    batch_size: int | None,
) -> lx.AbstractLinearOperator:
    """The Jacobian of `params ↦ fn(params, data)` as a lineax operator.

    Without `batch_size`: a `lineax.JacobianLinearOperator`, linearised once by the
    solver (it stores the activations for all data). With `batch_size`: a function
    operator that streams over batches and recomputes activations per batch.
    """
    if batch_size is None:
        return lx.JacobianLinearOperator(
            _FnOfArgs(fn), params, args=data, closure_convert=False
        )
    in_structure = jax.eval_shape(lambda: params)
    mv = _StreamedJVP(fn, params, batch_data(data, batch_size), num_data(data, "data"))
    return lx.FunctionLinearOperator(mv, in_structure, closure_convert=False)


class _FnOfArgs(eqx.Module):
    """`fn(x, args)` as lineax's `JacobianLinearOperator` calls it."""

    fn: Callable

    def __call__(self, params, args):
        return self.fn(params, args)


# ---------------------------------------------------------------------------------
# Public: the Jacobian operator.
# ---------------------------------------------------------------------------------


def jacobian_operator(
    model_fn: Callable[[PyTree[Array], Any], Float[Array, "N ..."]],
    params: PyTree[Float[ArrayLike, "..."]],
    inputs: PyTree[ArrayLike],
    *,
    batch_size: int | None = None,
) -> lx.AbstractLinearOperator:
    r"""The Jacobian $J = \partial f(\theta, X) / \partial \theta$ of a model's outputs
    over a data set, as a lineax operator from parameter pytrees to outputs.

    $J v$ is a Jacobian-vector product and $J^\mathsf{T} u$ a vector-Jacobian
    product; $J$ is never materialised. Pass it to [`matfree_lstsq.lstsq`][] (or any
    lineax solver).

    **Arguments:**

    - `model_fn`: the model, `model_fn(params, inputs) -> outputs` with outputs of
        shape `(N, O)` or `(N,)` for `N` inputs.
    - `params`: the point $\theta$ of linearisation, any pytree of floating-point
        arrays of one dtype.
    - `inputs`: the data $X$, an array (or pytree of arrays) with a leading data axis
        of size `N`.
    - `batch_size`: if given, products stream over the data in batches of this size
        (the last one padded by repeating the last input), recomputing the forward
        pass per batch: memory holds one batch's activations instead of the whole
        data set's. If `None`, the solver linearises the model once over all data.

    **Returns:**

    A `lineax.AbstractLinearOperator` with `in_structure()` the structure of `params`
    and `out_structure()` that of `model_fn(params, inputs)`.
    """
    check_positive_int("batch_size", batch_size, allow_none=True)
    params = as_arrays(params, "params")
    inputs = as_arrays(inputs, "inputs")
    model_output(model_fn, params, inputs)
    return data_jacobian(ModelOutputs(model_fn), params, (inputs,), batch_size)


# ---------------------------------------------------------------------------------
# Public: the square root of the GGN.
# ---------------------------------------------------------------------------------


class _SqrtHessianT(eqx.Module):
    r"""$u \mapsto L^\mathsf{T} u$ datum by datum, where $L L^\mathsf{T}$ is the
    Hessian of the negative log-likelihood with respect to the outputs."""

    likelihood: str = eqx.field(static=True)
    probs: Array | None  # softmax / sigmoid of the outputs (classification, binary)
    noise_std: Array | None  # regression

    def __call__(self, u: Array) -> Array:
        if self.likelihood == "regression":
            assert self.noise_std is not None
            return u / self.noise_std.astype(u.dtype)
        assert self.probs is not None
        p = self.probs
        if self.likelihood == "binary":
            return jnp.sqrt(p * (1 - p)) * u
        # Softmax cross-entropy: H = diag(p) − p pᵀ = L Lᵀ with
        # L = diag(√p) − p √pᵀ (using Σ p = 1), so Lᵀ u = √p ⊙ u − √p (pᵀ u).
        sqrt_p = jnp.sqrt(p)
        return sqrt_p * u - sqrt_p * jnp.sum(p * u, axis=-1, keepdims=True)


def _probabilities(likelihood: str, outputs: Array) -> Array:
    if likelihood == "classification":
        return jax.nn.softmax(outputs, axis=-1)
    return jax.nn.sigmoid(outputs)


def ggn_sqrt_operator(
    model_fn: Callable[[PyTree[Array], Any], Float[Array, "N ..."]],
    params: PyTree[Float[ArrayLike, "..."]],
    inputs: PyTree[ArrayLike],
    *,
    likelihood: Literal["regression", "classification", "binary"],
    noise_std: Float[ArrayLike, ""] = 1.0,
    batch_size: int | None = None,
) -> lx.AbstractLinearOperator:
    r"""A square root $\tilde J = L^\mathsf{T} J$ of the generalised Gauss–Newton
    matrix $G = J^\mathsf{T} H J = \tilde J^\mathsf{T} \tilde J$.

    $J$ is the model's Jacobian over the data
    ([`matfree_lstsq.applications.jacobian_operator`][]) and $H = L L^\mathsf{T}$
    the block-diagonal Hessian of the negative log-likelihood with respect to the
    outputs $f$, one block per datum:

    - `"regression"` (Gaussian, $-\log p = \|y - f\|^2 / (2\sigma^2)$ + const):
        $L = I/\sigma$;
    - `"classification"` (softmax cross-entropy, outputs are logits of shape
        `(N, C)`): $H = \operatorname{diag}(p) - p p^\mathsf{T}$ and
        $L = \operatorname{diag}(\sqrt p) - p \sqrt{p}^\mathsf{T}$, $p$ the softmax;
    - `"binary"` (sigmoid cross-entropy, outputs are logits of shape `(N,)` or
        `(N, 1)`): $L = \sqrt{p(1 - p)}$, $p$ the sigmoid.

    $H$ does not depend on the targets for these likelihoods (canonical links).

    **Arguments:**

    - `model_fn`, `params`, `inputs`, `batch_size`: as for
        [`matfree_lstsq.applications.jacobian_operator`][].
    - `likelihood`: `"regression"`, `"classification"` or `"binary"`.
    - `noise_std`: $\sigma > 0$, the observation noise of `"regression"` (ignored
        otherwise).

    **Returns:**

    A lineax operator from parameter pytrees to arrays shaped like the outputs.

    **References:**

    N. N. Schraudolph, *Fast curvature matrix-vector products for second-order
    gradient descent*, Neural Computation 14(7), 2002. J. Martens, *New insights and
    perspectives on the natural gradient method*, JMLR 21, 2020.
    """
    check_likelihood(likelihood)
    check_positive_scalar("noise_std", noise_std)
    check_positive_int("batch_size", batch_size, allow_none=True)
    params = as_arrays(params, "params")
    inputs = as_arrays(inputs, "inputs")
    out = model_output(model_fn, params, inputs)
    if likelihood == "classification" and (out.ndim != 2 or out.shape[1] < 2):
        raise ValueError(
            "`likelihood='classification'` needs logits of shape (N, C) with C >= 2; "
            f"`model_fn` returns shape {out.shape}."
        )
    if likelihood == "binary" and not (
        out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1)
    ):
        raise ValueError(
            "`likelihood='binary'` needs logits of shape (N,) or (N, 1); `model_fn` "
            f"returns shape {out.shape}."
        )
    jac = data_jacobian(ModelOutputs(model_fn), params, (inputs,), batch_size)
    if likelihood == "regression":
        sqrt_h = _SqrtHessianT(likelihood, None, jnp.asarray(noise_std, out.dtype))
    else:
        outputs = map_batches(lambda x: model_fn(params, x), inputs, batch_size)
        sqrt_h = _SqrtHessianT(likelihood, _probabilities(likelihood, outputs), None)
    sqrt_h_op = lx.FunctionLinearOperator(sqrt_h, out, closure_convert=False)
    return sqrt_h_op @ jac
