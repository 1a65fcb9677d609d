"""`mfa.jacobian_operator` and `mfa.ggn_sqrt_operator` against dense oracles.

Oracles: the dense Jacobian from `jax.jacfwd` of the flattened model, and the GGN
`Σ_n J_nᵀ H_n J_n` with `H_n` the Hessian of each datum's negative log-likelihood with
respect to the outputs from `jax.hessian` (independent of the square-root
factorisation under test).
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from app_models import AppProblem, init_mlp, mlp, mlp_problem, mlp_scalar, normal
from jax.flatten_util import ravel_pytree

from matfree_lstsq import applications as mfa


@pytest.fixture(scope="module")
def problem():
    # 5 → 8 → 3 (75 parameters), 13 data: batches of 5 leave a padded last batch.
    return mlp_problem((5, 8, 3), num_data=13, seed=3)


@eqx.filter_jit
def _dense(operator, params):
    """Materialise `operator` as a matrix in `ravel_pytree` order (columns), from
    products with unit parameter vectors."""
    flat, unravel = ravel_pytree(params)
    return jax.vmap(lambda e: operator.mv(unravel(e)).reshape(-1))(jnp.eye(flat.size)).T


@eqx.filter_jit
def _dense_transpose(operator):
    """Materialise `operator.T` as a matrix (rows: parameters in `ravel_pytree`
    order), from products with unit output vectors."""
    out = operator.out_structure()
    size = int(np.prod(out.shape))

    def column(e):
        return ravel_pytree(operator.T.mv(e.reshape(out.shape)))[0]

    return jax.vmap(column)(jnp.eye(size)).T


@pytest.mark.parametrize("batch_size", [None, 5, 13, 40])
def test_jacobian_matches_dense(problem, batch_size):
    op = mfa.jacobian_operator(
        problem.model_fn, problem.params, problem.inputs, batch_size=batch_size
    )
    assert isinstance(op, lx.AbstractLinearOperator)
    assert op.out_structure().shape == (13, 3)
    assert jax.tree.structure(op.in_structure()) == jax.tree.structure(problem.params)
    oracle = problem.dense_jacobian()
    np.testing.assert_allclose(
        _dense(op, problem.params), oracle, rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(_dense_transpose(op), oracle.T, rtol=1e-12, atol=1e-12)


def test_jacobian_scalar_outputs_and_pytree_inputs():
    params = init_mlp(0, [3, 4, 1])
    x = normal(1, (7, 3))

    def model(p, inputs):  # inputs is a dict: a pytree of arrays with a data axis
        return mlp_scalar(p, inputs["x"] * inputs["scale"][:, None])

    inputs = {"x": x, "scale": jnp.linspace(0.5, 1.5, 7)}
    op = mfa.jacobian_operator(model, params, inputs, batch_size=3)
    assert op.out_structure().shape == (7,)
    oracle = AppProblem(model, params, inputs, x).dense_jacobian()
    np.testing.assert_allclose(_dense(op, params), oracle, rtol=1e-12, atol=1e-12)


def _nll(likelihood, noise_std):
    """Per-datum negative log-likelihood as a function of one datum's outputs."""
    if likelihood == "regression":
        return lambda f, y: jnp.sum((f - y) ** 2) / (2 * noise_std**2)
    if likelihood == "classification":
        return lambda f, y: -jax.nn.log_softmax(f)[y]
    return lambda f, y: jnp.sum(
        -y * jax.nn.log_sigmoid(f) - (1 - y) * jax.nn.log_sigmoid(-f)
    )


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _dense_ggn(model, params, inputs, likelihood, noise_std):
    nll = _nll(likelihood, noise_std)
    flat, unravel = ravel_pytree(params)
    f = model(params, inputs)
    n = f.shape[0]
    jac = jax.jacfwd(lambda p: model(unravel(p), inputs))(flat)  # (N, [O,] P)
    # H does not depend on the targets for these likelihoods: any will do.
    targets = jnp.zeros(n, jnp.int32) if likelihood == "classification" else f
    hess = jax.vmap(jax.hessian(nll))(f, targets)  # (N, [O, O])
    if f.ndim == 1:
        return jnp.einsum("np,n,nq->pq", jac, hess, jac), f
    return jnp.einsum("nop,nor,nrq->pq", jac, hess, jac), f


@pytest.mark.parametrize(
    "likelihood, outputs, batch_size",
    [
        ("regression", 3, None),
        ("regression", 3, 5),
        ("classification", 3, None),
        ("classification", 3, 4),
        ("binary", 1, None),
        ("binary", 1, 6),
    ],
)
def test_ggn_sqrt_matches_dense_ggn(likelihood, outputs, batch_size):
    params = init_mlp(4, [4, 6, outputs], bias_scale=0.5)
    inputs = normal(5, (11, 4))
    model = mlp if outputs > 1 or likelihood != "binary" else mlp_scalar
    noise_std = 0.3
    op = mfa.ggn_sqrt_operator(
        model,
        params,
        inputs,
        likelihood=likelihood,
        noise_std=noise_std,
        batch_size=batch_size,
    )
    ggn, f = _dense_ggn(model, params, inputs, likelihood, noise_std)
    sqrt = _dense(op, params)
    np.testing.assert_allclose(sqrt.T @ sqrt, ggn, rtol=1e-10, atol=1e-12)
    assert op.out_structure().shape == f.shape


def test_bad_input(problem):
    with pytest.raises(ValueError, match="params"):
        # A parameter dictionary with a misnamed layer: the model cannot use it.
        bad = {("V1" if k == "W1" else k): v for k, v in problem.params.items()}
        mfa.jacobian_operator(problem.model_fn, bad, problem.inputs)
    with pytest.raises(ValueError, match="params"):
        # Wrong shapes: the model fails on them.
        bad = dict(problem.params, W0=jnp.zeros((4, 8)))
        mfa.jacobian_operator(problem.model_fn, bad, problem.inputs)
    with pytest.raises(ValueError, match="floating"):
        mfa.jacobian_operator(problem.model_fn, {"w": jnp.arange(3)}, problem.inputs)
    with pytest.raises(ValueError, match="shape"):
        # Outputs with a third axis.
        mfa.jacobian_operator(
            lambda p, x: mlp(p, x)[:, :, None], problem.params, problem.inputs
        )
    with pytest.raises(ValueError, match="batch_size"):
        mfa.jacobian_operator(
            problem.model_fn, problem.params, problem.inputs, batch_size=0
        )
    with pytest.raises(ValueError, match="likelihood"):
        mfa.ggn_sqrt_operator(
            problem.model_fn, problem.params, problem.inputs, likelihood="poisson"
        )
    with pytest.raises(ValueError, match="noise_std"):
        mfa.ggn_sqrt_operator(
            problem.model_fn,
            problem.params,
            problem.inputs,
            likelihood="regression",
            noise_std=-1.0,
        )
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, 1\)"):
        mfa.ggn_sqrt_operator(
            problem.model_fn, problem.params, problem.inputs, likelihood="binary"
        )
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        mfa.ggn_sqrt_operator(
            mlp_scalar, problem.params, problem.inputs, likelihood="classification"
        )
