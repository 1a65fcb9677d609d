"""Gaussian-process hyperparameters through `mfl.lstsq` (the recipe of
`examples/gp_hyperparameters.py`, rebuilt here at a small size).

A GP with a random-Fourier-feature kernel: the posterior mean weights are the damped
least-squares solution $\\arg\\min_w \\|\\Phi w - y\\|^2 + \\sigma^2\\|w\\|^2$ (damp =
noise) and the predictive variances need $(\\Phi^\\mathsf{T}\\Phi + \\sigma^2 I)^{-1}
\\phi_*$, obtained in the same solve with an initial guess. The held-out negative
log-likelihood depends on the lengthscale and amplitude through the operator and on
the noise through `damp` and `x0`; its gradient through the solve is checked against
central finite differences (1e-5 relative, the acceptance criterion) and against
autodiff of a dense Cholesky implementation.
"""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import matfree_lstsq as mfl


SOLVER = mfl.LSMR(atol=1e-12, btol=1e-12)
NUM_FEATURES = 16


def make_problem():
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, (42, 2))
    y = np.sin(2 * x[:, 0]) * np.cos(x[:, 1]) + 0.1 * rng.standard_normal(42)
    omega = jnp.asarray(rng.standard_normal((NUM_FEATURES, 2)))
    phase = jnp.asarray(rng.uniform(0, 2 * np.pi, NUM_FEATURES))

    def features(hyper, x):
        scale = jnp.exp(hyper["log_amplitude"]) * np.sqrt(2.0 / NUM_FEATURES)
        return scale * jnp.cos(
            (x / jnp.exp(hyper["log_lengthscale"])) @ omega.T + phase
        )

    data = tuple(jnp.asarray(a) for a in (x[:30], y[:30], x[30:], y[30:]))
    return features, data


def predict(features, hyper, x_fit, y_fit, x_val):
    """Mean and variance from one lstsq solve for the pair (w, Z)."""
    noise = jnp.exp(hyper["log_noise"])
    phi = features(hyper, x_fit)
    phi_val = features(hyper, x_val)
    structure = (
        jax.ShapeDtypeStruct((NUM_FEATURES,), phi.dtype),
        jax.ShapeDtypeStruct((NUM_FEATURES, x_val.shape[0]), phi.dtype),
    )
    operator = lx.FunctionLinearOperator(lambda v: (phi @ v[0], phi @ v[1]), structure)
    rhs = (y_fit, jnp.zeros((x_fit.shape[0], x_val.shape[0]), phi.dtype))
    x0 = (jnp.zeros(NUM_FEATURES, phi.dtype), phi_val.T / noise**2)
    w, z = mfl.lstsq(operator, rhs, SOLVER, damp=noise, x0=x0).value
    return phi_val @ w, noise**2 * (1 + jnp.sum(phi_val.T * z, axis=0))


def predict_dense(features, hyper, x_fit, y_fit, x_val):
    noise = jnp.exp(hyper["log_noise"])
    phi = features(hyper, x_fit)
    phi_val = features(hyper, x_val)
    a = phi.T @ phi + noise**2 * jnp.eye(NUM_FEATURES)
    mean = phi_val @ jnp.linalg.solve(a, phi.T @ y_fit)
    var = noise**2 * (1 + jnp.sum(phi_val * jnp.linalg.solve(a, phi_val.T).T, axis=1))
    return mean, var


def nll(mean, var, y):
    return jnp.mean(0.5 * jnp.log(2 * np.pi * var) + (y - mean) ** 2 / (2 * var))


@pytest.fixture(scope="module")
def gp():
    features, (x_fit, y_fit, x_val, y_val) = make_problem()

    def loss(hyper):
        return nll(*predict(features, hyper, x_fit, y_fit, x_val), y_val)

    def loss_dense(hyper):
        return nll(*predict_dense(features, hyper, x_fit, y_fit, x_val), y_val)

    return (
        jax.jit(jax.value_and_grad(loss)),
        jax.jit(jax.value_and_grad(loss_dense)),
    )


def value_tolerance(hyper):
    """`10 · atol · cond([Φ; σI]) · ‖∇ₓ loss‖‖x‖/|loss|` at the dense solution x."""
    features, (x_fit, y_fit, x_val, y_val) = make_problem()
    noise = jnp.exp(hyper["log_noise"])
    phi, phi_val = features(hyper, x_fit), features(hyper, x_val)
    s = np.linalg.svd(np.asarray(phi), compute_uv=False)
    cond = float(np.sqrt((s[0] ** 2 + noise**2) / (s[-1] ** 2 + noise**2)))
    a = phi.T @ phi + noise**2 * jnp.eye(NUM_FEATURES)
    solution = (jnp.linalg.solve(a, phi.T @ y_fit), jnp.linalg.solve(a, phi_val.T))

    def loss(solution):
        w, z = solution
        var = noise**2 * (1 + jnp.sum(phi_val.T * z, axis=0))
        return nll(phi_val @ w, var, y_val)

    grad = ravel_pytree(jax.grad(loss)(solution))[0]
    norm_x = jnp.linalg.norm(ravel_pytree(solution)[0])
    sensitivity = float(jnp.linalg.norm(grad) * norm_x / jnp.abs(loss(solution)))
    return 10 * SOLVER.atol * cond * sensitivity


# A moderate noise level, and a small one (damping ≈ 0.005‖Φ‖_F; the NLL scales
# the residuals by 1/σ², so its value is ill-conditioned there).
POINTS = {
    "moderate-noise": {
        "log_lengthscale": jnp.asarray(np.log(0.8)),
        "log_amplitude": jnp.asarray(np.log(1.3)),
        "log_noise": jnp.asarray(np.log(0.3)),
    },
    "small-noise": {
        "log_lengthscale": jnp.asarray(np.log(1.5)),
        "log_amplitude": jnp.asarray(np.log(0.7)),
        "log_noise": jnp.asarray(np.log(0.02)),
    },
}


@pytest.mark.parametrize("point", POINTS, ids=list(POINTS))
def test_hyperparameter_gradient_through_solve(gp, point):
    value_and_grad, value_and_grad_dense = gp
    hyper = POINTS[point]
    value, grad = value_and_grad(hyper)
    value_dense, grad_dense = value_and_grad_dense(hyper)
    grad = np.asarray(ravel_pytree(grad)[0])
    grad_dense = np.asarray(ravel_pytree(grad_dense)[0])
    # The loss through the solve is the dense loss, to the accuracy the solver's
    # tolerance promises: LSMR stops with ‖δx‖ ≲ atol·cond(K)·‖x‖ (K = [Φ; σI]),
    # and the loss moves by at most ‖∇ₓ loss‖·‖δx‖. (Bound 3.2e-8 at the small-noise
    # point; measured 1e-12 to 7.3e-10 relative, depending on the machine's
    # instruction set. A fixed 1e-10 failed on AVX-512.)
    np.testing.assert_allclose(value, value_dense, rtol=value_tolerance(hyper))

    # Fourth-order central finite differences of the same (solve-based) loss. The
    # step balances the O(h⁴) truncation error against the forward solves' error
    # (~1e-11 relative, amplified by 1/h; ill-conditioned at small noise, where the
    # NLL scales residuals by 1/σ²): second-order differences with h = 1e-5 see
    # 1e-5-relative noise at the small-noise point even though the gradient agrees
    # with the dense one to 1e-10.
    flat, unravel = ravel_pytree(hyper)
    h = 1e-3
    f = lambda v: float(value_and_grad(unravel(v))[0])
    fd = np.zeros(flat.size)
    for i in range(flat.size):
        e = np.zeros(flat.size)
        e[i] = h
        fd[i] = (
            8 * (f(flat + e) - f(flat - e)) - (f(flat + 2 * e) - f(flat - 2 * e))
        ) / (12 * h)
    # Every component matters: none is negligible next to the others.
    assert np.min(np.abs(fd)) > 1e-3 * np.linalg.norm(fd)
    err_fd = np.linalg.norm(grad - fd) / np.linalg.norm(fd)
    err_dense = np.linalg.norm(grad - grad_dense) / np.linalg.norm(grad_dense)
    print(f"{point}: relative error vs FD {err_fd:.2e}, vs dense {err_dense:.2e}")
    assert err_fd <= 1e-5
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=0)
    assert err_dense <= 1e-8
