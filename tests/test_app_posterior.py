"""Projected posteriors, linearised Laplace and predictions, against dense oracles
and Monte-Carlo checks whose tolerances come from the sample size."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from app_models import (
    linear_model,
    mlp_problem,
    mlp_scalar,
    normal,
    tiny_classifier,
    tiny_regressor,
)
from jax.flatten_util import ravel_pytree

from matfree_lstsq import applications as mfa


def flat_samples(samples) -> np.ndarray:
    """`(S, D)` matrix of samples in `ravel_pytree` order."""
    return np.asarray(jax.vmap(lambda s: ravel_pytree(s)[0])(samples))


# ---------------------------------------------------------------------------------
# Projected posterior.
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def projected():
    # 32 → 16 → 3 MLP (579 parameters) on 100 inputs: J is 300 × 579, full row rank.
    problem = mlp_problem((32, 16, 3), num_data=100, seed=11)
    samples, info = mfa.projected_posterior(
        jax.random.PRNGKey(0),
        problem.model_fn,
        problem.params,
        problem.inputs,
        num_samples=4,
    )
    return problem, samples, info


def test_projected_samples_keep_training_predictions(projected):
    problem, samples, info = projected
    f_map = problem.model_fn(problem.params, problem.inputs)
    f_lin = mfa.linearised_predict(
        problem.model_fn, problem.params, samples, problem.inputs
    )
    assert f_lin.shape == (4, 100, 3)
    scale = float(jnp.max(jnp.abs(f_map)))
    for s in range(4):
        assert float(jnp.max(jnp.abs(f_lin[s] - f_map))) <= 1e-6 * scale
    # The samples do move: the network itself, and the linearised model away from
    # the training data, predict differently at every sample.
    f_net = mfa.sample_predict(problem.model_fn, samples, problem.inputs)
    test_inputs = normal(12, (50, 32))
    f_test = mfa.linearised_predict(
        problem.model_fn, problem.params, samples, test_inputs
    )
    f_test_map = problem.model_fn(problem.params, test_inputs)
    for s in range(4):
        assert float(jnp.max(jnp.abs(f_net[s] - f_map))) >= 1e-2 * scale
        assert float(jnp.max(jnp.abs(f_test[s] - f_test_map))) >= 1e-2 * scale
    assert np.all(np.asarray(info["projection"]["residual"]) <= 1e-10)


def test_projected_posterior_evidence_on_mlp(projected):
    problem, samples, info = projected
    # rank J = 300 (full row rank); the Hutchinson estimate is unbiased with the
    # reported standard error.
    rank, stderr = float(info["rank"]), float(info["rank_stderr"])
    assert abs(rank - 300) <= 4 * stderr
    norm2 = sum(float(jnp.sum(p**2)) for p in jax.tree.leaves(problem.params))
    assert float(info["prior_precision"]) == pytest.approx(rank / norm2, rel=1e-12)
    # Samples are θ̂ + α^{-1/2} P ε: their deviations lie in ker J.
    deviations = flat_samples(samples) - np.asarray(ravel_pytree(problem.params)[0])
    jac = problem.dense_jacobian()
    for d in deviations:
        assert np.linalg.norm(jac @ d) <= 1e-8 * np.linalg.norm(jac) * np.linalg.norm(d)


def test_evidence_matches_exact_maximiser():
    """Linear-Gaussian model y = X w + noise, w ~ N(0, α⁻¹I), X of shape 30 × 40.

    The exact log evidence is log N(y; 0, α⁻¹XXᵀ + σ²I). In the high-precision limit
    (σ → 0) its maximiser is rank/‖ŵ‖² with ŵ = X⁺y, the MAP in that limit; the
    recipe estimates the rank by Hutchinson from 10 000 samples, whose standard error
    on the rank is √(2 (D − r) / S) = 0.045 (0.15 % of r = 30), well inside 1 %.
    """
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 40))
    y = x @ rng.standard_normal(40) + 0.1 * rng.standard_normal(30)
    w_hat = np.linalg.pinv(x) @ y
    sigma = 1e-6
    eigval, eigvec = np.linalg.eigh(x @ x.T)
    z = eigvec.T @ y

    def negative_log_evidence(log_alpha):
        var = eigval / np.exp(log_alpha) + sigma**2
        return 0.5 * np.sum(np.log(var) + z**2 / var)

    opt = scipy.optimize.minimize_scalar(
        negative_log_evidence,
        bounds=(-10, 10),
        method="bounded",
        options={"xatol": 1e-10},
    )
    alpha_exact = float(np.exp(opt.x))
    _, info = mfa.projected_posterior(
        jax.random.PRNGKey(1),
        linear_model,
        {"w": jnp.asarray(w_hat)},
        jnp.asarray(x),
        num_samples=10_000,
    )
    assert float(info["prior_precision"]) == pytest.approx(alpha_exact, rel=1e-2)
    assert abs(float(info["rank"]) - 30) <= 4 * float(info["rank_stderr"])


def test_prior_precision_given():
    problem = mlp_problem((4, 5, 1), num_data=6, seed=13)
    samples, info = mfa.projected_posterior(
        jax.random.PRNGKey(2),
        problem.model_fn,
        problem.params,
        problem.inputs,
        num_samples=1,
        prior_precision=4.0,
        method="dense",
    )
    assert float(info["prior_precision"]) == 4.0
    assert np.isnan(float(info["rank_stderr"]))  # one sample: no standard error
    assert jax.tree.structure(samples) == jax.tree.structure(problem.params)
    # θ − θ̂ = P ε / 2 for the recipe's own ε: in the kernel, of the right scale.
    deviation = flat_samples(samples)[0] - np.asarray(ravel_pytree(problem.params)[0])
    jac = problem.dense_jacobian()
    assert np.linalg.norm(jac @ deviation) <= 1e-12 * np.linalg.norm(deviation)


# ---------------------------------------------------------------------------------
# Linearised Laplace: Monte-Carlo covariance against the dense (G + αI)⁻¹.
# ---------------------------------------------------------------------------------

NUM_LAPLACE = 20_000


def _nll(likelihood, noise_std):
    if likelihood == "regression":
        return lambda f, y: (f - y) ** 2 / (2 * noise_std**2)
    return lambda f, y: -jax.nn.log_softmax(f)[y]


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _dense_ggn(model_fn, params, inputs, likelihood, noise_std):
    """Σ_n J_nᵀ H_n J_n with H_n the Hessian of the datum's NLL (jax.hessian)."""
    flat, unravel = ravel_pytree(params)
    f = model_fn(params, inputs)
    jac = jax.jacfwd(lambda p: model_fn(unravel(p), inputs))(flat)
    targets = jnp.zeros(f.shape[0], jnp.int32) if f.ndim == 2 else f
    hess = jax.vmap(jax.hessian(_nll(likelihood, noise_std)))(f, targets)
    if f.ndim == 1:
        return jnp.einsum("np,n,nq->pq", jac, hess, jac)
    return jnp.einsum("nop,nor,nrq->pq", jac, hess, jac)


@pytest.mark.parametrize(
    "likelihood, problem, noise_std",
    [
        ("regression", tiny_regressor(), 0.5),
        ("classification", tiny_classifier(), 1.0),
    ],
    ids=["regression", "classification"],
)
def test_laplace_covariance(likelihood, problem, noise_std):
    alpha = 2.0
    assert problem.num_params <= 50
    samples, info = mfa.laplace_posterior(
        jax.random.PRNGKey(4),
        problem.model_fn,
        problem.params,
        problem.inputs,
        NUM_LAPLACE,
        likelihood=likelihood,
        prior_precision=alpha,
        noise_std=noise_std,
    )
    assert np.all(np.asarray(info["residual"]) <= 1e-9)
    ggn = np.asarray(
        _dense_ggn(
            problem.model_fn, problem.params, problem.inputs, likelihood, noise_std
        )
    )
    cov = np.linalg.inv(ggn + alpha * np.eye(ggn.shape[0]))
    # The GGN matters: the covariance is far from the prior's α⁻¹I.
    assert np.linalg.norm(cov - np.eye(len(cov)) / alpha) >= 0.3 * np.linalg.norm(cov)
    x = flat_samples(samples) - np.asarray(ravel_pytree(problem.params)[0])
    # Known mean θ̂: the estimate (1/S) Σ x xᵀ has Var = (C_ij² + C_ii C_jj) / S.
    estimate = x.T @ x / NUM_LAPLACE
    stderr = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / NUM_LAPLACE)
    assert np.all(np.abs(estimate - cov) <= 4 * stderr)
    mean_stderr = np.sqrt(np.diag(cov) / NUM_LAPLACE)
    assert np.all(np.abs(x.mean(axis=0)) <= 4 * mean_stderr)


# ---------------------------------------------------------------------------------
# Predictions.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [None, 3])
def test_predictions_match_oracles(batch_size):
    problem = mlp_problem((3, 4, 2), num_data=7, seed=14)
    flat, unravel = ravel_pytree(problem.params)
    thetas = flat[None] + 0.3 * normal(15, (5, flat.size))
    samples = jax.vmap(unravel)(thetas)
    jac = problem.dense_jacobian().reshape(7, 2, -1)
    f_map = np.asarray(problem.model_fn(problem.params, problem.inputs))
    lin = mfa.linearised_predict(
        problem.model_fn, problem.params, samples, problem.inputs, batch_size=batch_size
    )
    net = mfa.sample_predict(
        problem.model_fn, samples, problem.inputs, batch_size=batch_size
    )
    assert lin.shape == net.shape == (5, 7, 2)
    for s in range(5):
        delta = np.asarray(thetas[s] - flat)
        np.testing.assert_allclose(lin[s], f_map + jac @ delta, rtol=1e-12, atol=1e-12)
        expected = problem.model_fn(unravel(thetas[s]), problem.inputs)
        np.testing.assert_allclose(net[s], expected, rtol=1e-12, atol=1e-12)
    # Scalar outputs keep their shape (S, N).
    scalar = mfa.sample_predict(mlp_scalar, samples, problem.inputs)
    assert scalar.shape == (5, 7)


# ---------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------


def test_bad_input():
    problem = mlp_problem((3, 4, 2), num_data=7, seed=16)
    args = (jax.random.PRNGKey(0), problem.model_fn, problem.params, problem.inputs)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_samples"):
            mfa.projected_posterior(*args, bad)
        with pytest.raises(ValueError, match="num_samples"):
            mfa.laplace_posterior(
                *args, bad, likelihood="classification", prior_precision=1.0
            )
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="prior_precision"):
            mfa.projected_posterior(*args, 2, prior_precision=bad)
        with pytest.raises(ValueError, match="prior_precision"):
            mfa.laplace_posterior(
                *args, 2, likelihood="classification", prior_precision=bad
            )
    with pytest.raises(ValueError, match="likelihood"):
        mfa.laplace_posterior(*args, 2, likelihood="gaussian", prior_precision=1.0)
    with pytest.raises(ValueError, match="noise_std"):
        mfa.laplace_posterior(
            *args, 2, likelihood="regression", prior_precision=1.0, noise_std=0.0
        )
    with pytest.raises(ValueError, match="params"):
        bad_params = dict(problem.params, W1=jnp.zeros((3, 2)))
        mfa.laplace_posterior(
            args[0],
            problem.model_fn,
            bad_params,
            problem.inputs,
            2,
            likelihood="regression",
            prior_precision=1.0,
        )
    samples = jax.tree.map(lambda p: jnp.stack([p, p]), problem.params)
    with pytest.raises(ValueError, match="samples"):
        # Samples without the sample axis.
        mfa.linearised_predict(
            problem.model_fn, problem.params, problem.params, problem.inputs
        )
    with pytest.raises(ValueError, match="samples"):
        mfa.linearised_predict(
            problem.model_fn, problem.params, {"W0": samples["W0"]}, problem.inputs
        )
    with pytest.raises(ValueError, match="samples"):
        uneven = dict(samples, b0=jnp.zeros((3, 4)))
        mfa.sample_predict(problem.model_fn, uneven, problem.inputs)
