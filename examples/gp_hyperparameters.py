r"""Gaussian-process hyperparameters tuned through a least-squares solve.

Gaussian-process regression on scikit-learn's diabetes data (442 patients, 10
features). The squared-exponential kernel is approximated by D random Fourier
features, $k(x, x') \approx \phi(x)^\mathsf{T}\phi(x')$ with
$\phi(x) = s \sqrt{2/D} \cos(\Omega x / \ell + b)$. With the prior
$w \sim N(0, I)$ and Gaussian noise of standard deviation $\sigma$, the posterior
mean of the weights is a *damped least-squares solve*, damping = noise:

$$\bar w = \arg\min_w \|\Phi w - y\|^2 + \sigma^2 \|w\|^2,$$

and the predictive variance at $x_*$ is $\sigma^2 (1 + \phi_*^\mathsf{T} z_*)$ with
$z_* = (\Phi^\mathsf{T}\Phi + \sigma^2 I)^{-1}\phi_*$: the same damped problem
with right-hand side 0 and initial guess $x_0 = \phi_*/\sigma^2$. One `mfl.lstsq`
call solves for $\bar w$ and all the $z_*$ together (a pytree unknown).

The hyperparameters (lengthscale $\ell$, amplitude $s$, noise $\sigma$) are tuned
two ways and compared on held-out test data:

1. by gradient descent on the predictive negative log-likelihood of a validation set,
   differentiating *through* `matfree_lstsq.lstsq` (values, damping and the operator
   all depend on the hyperparameters);
2. by maximising the marginal likelihood of the training data (dense Cholesky, the
   textbook type-II maximum likelihood).

Before tuning, the gradient through the solves is checked against finite
differences (relative error at most 1e-5) and against autodiff of a dense
implementation; the script exits with a non-zero status if a check fails.

Run with `MFL_EXAMPLE_SMALL=1` for a smaller, faster version (as CI does). A figure
of the optimisation traces is written to `MFL_EXAMPLE_OUTDIR` (default
`examples/figures/`).
"""

import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import lineax as lx
import matplotlib
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_diabetes


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import matfree_lstsq as mfl  # noqa: E402


# Double precision, enabled before any array is created.
jax.config.update("jax_enable_x64", True)

SMALL = os.environ.get("MFL_EXAMPLE_SMALL", "0") not in ("", "0")
OUTDIR = Path(os.environ.get("MFL_EXAMPLE_OUTDIR") or Path(__file__).parent / "figures")
NUM_FEATURES = 64 if SMALL else 256
NUM_STEPS = 40 if SMALL else 300
LEARNING_RATE = 0.05
SOLVER = mfl.LSMR(atol=1e-12, btol=1e-12)
GRADIENT_TOL = 1e-5  # relative error of the gradient against finite differences
AGREEMENT = 1e-8  # lstsq against dense linear algebra, relative


# ---------------------------------------------------------------------------------
# Data: train (fit + validation) and test, standardised with training statistics.
# ---------------------------------------------------------------------------------


def load_data():
    x, y = load_diabetes(return_X_y=True)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(y))
    n_test = len(y) // 5
    n_val = len(y) // 5
    test, val, fit = np.split(perm, [n_test, n_test + n_val])
    train = np.concatenate([fit, val])
    x_mean, x_std = x[train].mean(0), x[train].std(0)
    y_mean, y_std = y[train].mean(), y[train].std()
    x = (x - x_mean) / x_std
    y = (y - y_mean) / y_std
    data = {
        name: (jnp.asarray(x[idx]), jnp.asarray(y[idx]))
        for name, idx in (("fit", fit), ("val", val), ("train", train), ("test", test))
    }
    return data, float(y_std)


# ---------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------


def init_hyperparameters(num_inputs: int) -> dict[str, jax.Array]:
    return {
        "log_lengthscale": jnp.asarray(np.log(np.sqrt(num_inputs))),
        "log_amplitude": jnp.zeros(()),
        "log_noise": jnp.asarray(np.log(0.5)),
    }


def make_features(num_inputs: int, num_features: int):
    key_w, key_b = jax.random.split(jax.random.key(0))
    omega = jax.random.normal(key_w, (num_features, num_inputs), jnp.float64)
    phase = jax.random.uniform(key_b, (num_features,), jnp.float64, maxval=2 * np.pi)

    def features(hyper, x):
        ell = jnp.exp(hyper["log_lengthscale"])
        amplitude = jnp.exp(hyper["log_amplitude"])
        scale = amplitude * np.sqrt(2.0 / num_features)
        return scale * jnp.cos((x / ell) @ omega.T + phase)

    return features


def predict(features, hyper, x_train, y_train, x_test):
    r"""Predictive mean and variance from ONE damped least-squares solve.

    The unknown is the pair $(w, Z)$: $w$ the posterior mean weights and the columns
    of $Z$ the vectors $z_* = (\Phi^\mathsf{T}\Phi + \sigma^2 I)^{-1}\phi_*$.
    The operator $(w, Z) \mapsto (\Phi w, \Phi Z)$ is block diagonal with identical
    blocks, so its Krylov spaces are no larger than those of $\Phi$ alone.
    """
    noise = jnp.exp(hyper["log_noise"])
    phi = features(hyper, x_train)
    phi_test = features(hyper, x_test)
    num_features, num_test = phi.shape[1], phi_test.shape[0]
    in_structure = (
        jax.ShapeDtypeStruct((num_features,), phi.dtype),
        jax.ShapeDtypeStruct((num_features, num_test), phi.dtype),
    )
    operator = lx.FunctionLinearOperator(
        lambda v: (phi @ v[0], phi @ v[1]), in_structure
    )
    # w = argmin ‖Φw − y‖² + σ²‖w‖² (damping = noise), and
    # z = argmin ‖Φz‖² + σ²‖z − φ*/σ²‖², i.e. (ΦᵀΦ + σ²I) z = φ*.
    rhs = (y_train, jnp.zeros((phi.shape[0], num_test), phi.dtype))
    x0 = (jnp.zeros(num_features, phi.dtype), phi_test.T / noise**2)
    w, z = mfl.lstsq(operator, rhs, SOLVER, damp=noise, x0=x0).value
    mean = phi_test @ w
    var = noise**2 * (1 + jnp.sum(phi_test.T * z, axis=0))
    return mean, var


def predict_dense(features, hyper, x_train, y_train, x_test):
    """The same predictions with dense Cholesky factorisations (the reference)."""
    noise = jnp.exp(hyper["log_noise"])
    phi = features(hyper, x_train)
    phi_test = features(hyper, x_test)
    a = phi.T @ phi + noise**2 * jnp.eye(phi.shape[1])
    chol = jnp.linalg.cholesky(a)

    def solve_a(b):
        return jax.scipy.linalg.cho_solve((chol, True), b)

    mean = phi_test @ solve_a(phi.T @ y_train)
    var = noise**2 * (1 + jnp.sum(phi_test * solve_a(phi_test.T).T, axis=1))
    return mean, var


def gaussian_nll(mean, var, y):
    return jnp.mean(0.5 * jnp.log(2 * np.pi * var) + (y - mean) ** 2 / (2 * var))


def negative_log_marginal_likelihood(features, hyper, x, y):
    """−log N(y; 0, ΦΦᵀ + σ²I) per data point, by the matrix determinant lemma and
    Woodbury's identity on the D×D matrix ΦᵀΦ + σ²I."""
    noise2 = jnp.exp(2 * hyper["log_noise"])
    phi = features(hyper, x)
    n, d = phi.shape
    chol = jnp.linalg.cholesky(phi.T @ phi + noise2 * jnp.eye(d))
    proj = jax.scipy.linalg.solve_triangular(chol, phi.T @ y, lower=True)
    quad = (y @ y - proj @ proj) / noise2
    logdet = 2 * jnp.sum(jnp.log(jnp.diag(chol))) + (n - d) * jnp.log(noise2)
    return 0.5 * (quad + logdet + n * np.log(2 * np.pi)) / n


# ---------------------------------------------------------------------------------
# Checks, tuning, evaluation.
# ---------------------------------------------------------------------------------


def gradient_check(value_and_grad, loss_dense, hyper) -> bool:
    flat, unravel = ravel_pytree(hyper)
    grad = np.asarray(ravel_pytree(value_and_grad(hyper)[1])[0])
    grad_dense = ravel_pytree(jax.jit(jax.grad(loss_dense))(hyper))[0]
    # Fourth-order central differences: the O(h⁴) truncation error and the forward
    # solves' error (about 1e-11 relative, amplified by 1/h) are both small at h=1e-3.
    h = 1e-3

    def f(v):
        return float(value_and_grad(unravel(v))[0])

    fd = np.zeros_like(grad)
    for i in range(flat.size):
        e = h * np.eye(flat.size)[i]
        fd[i] = (
            8 * (f(flat + e) - f(flat - e)) - (f(flat + 2 * e) - f(flat - 2 * e))
        ) / (12 * h)
    err_fd = np.linalg.norm(grad - fd) / np.linalg.norm(fd)
    err_dense = np.linalg.norm(grad - grad_dense) / np.linalg.norm(grad_dense)
    print("\nGradient of the held-out NLL through mfl.lstsq, at the initial point:")
    print(f"  relative error vs finite differences (4th order, h={h:g}): {err_fd:.2e}")
    print(f"  relative error vs autodiff of dense Cholesky:            {err_dense:.2e}")
    ok = bool(err_fd <= GRADIENT_TOL and err_dense <= GRADIENT_TOL)
    if not ok:
        print("gradient check FAILED", file=sys.stderr)
    return ok


def tune(value_and_grad, hyper, num_steps):
    """Adam on the hyperparameters; `value_and_grad` is jitted once by the caller."""
    optimiser = optax.adam(LEARNING_RATE)
    state = optimiser.init(hyper)

    @jax.jit
    def apply(grad, state, hyper):
        updates, state = optimiser.update(grad, state, hyper)
        return optax.apply_updates(hyper, updates), state

    jax.block_until_ready(apply(value_and_grad(hyper)[1], state, hyper))  # compile
    trace = []
    start = time.perf_counter()
    for _ in range(num_steps):
        value, grad = value_and_grad(hyper)
        hyper, state = apply(grad, state, hyper)
        trace.append(float(value))
    return hyper, np.asarray(trace), time.perf_counter() - start


def main() -> int:
    print(f"matfree_lstsq {mfl.__version__}, jax {jax.__version__}, small={SMALL}")
    data, y_std = load_data()
    x_fit, y_fit = data["fit"]
    x_val, y_val = data["val"]
    x_train, y_train = data["train"]
    x_test, y_test = data["test"]
    num_inputs = x_fit.shape[1]
    print(
        f"diabetes: {len(y_fit)} fit + {len(y_val)} validation = {len(y_train)} "
        f"train, {len(y_test)} test; {NUM_FEATURES} random Fourier features"
    )
    features = make_features(num_inputs, NUM_FEATURES)
    hyper0 = init_hyperparameters(num_inputs)

    def heldout_nll(hyper):
        return gaussian_nll(*predict(features, hyper, x_fit, y_fit, x_val), y_val)

    def heldout_nll_dense(hyper):
        return gaussian_nll(*predict_dense(features, hyper, x_fit, y_fit, x_val), y_val)

    def marginal(hyper):
        return negative_log_marginal_likelihood(features, hyper, x_train, y_train)

    heldout_value_and_grad = jax.jit(jax.value_and_grad(heldout_nll))
    marginal_value_and_grad = jax.jit(jax.value_and_grad(marginal))

    ok = gradient_check(heldout_value_and_grad, heldout_nll_dense, hyper0)

    results = {"initial": (hyper0, 0.0)}
    hyper_pred, trace_pred, t_pred = tune(heldout_value_and_grad, hyper0, NUM_STEPS)
    results["held-out NLL through lstsq"] = (hyper_pred, t_pred)
    hyper_ml, trace_ml, t_ml = tune(marginal_value_and_grad, hyper0, NUM_STEPS)
    results["marginal likelihood (dense)"] = (hyper_ml, t_ml)

    evaluate = jax.jit(lambda h: predict(features, h, x_train, y_train, x_test))

    def evaluate_dense(hyper):
        """The reference predictions in NumPy (float64, no compilation)."""
        phi = np.asarray(features(hyper, x_train))
        phi_test = np.asarray(features(hyper, x_test))
        noise2 = float(jnp.exp(2 * hyper["log_noise"]))
        a = phi.T @ phi + noise2 * np.eye(phi.shape[1])
        mean = phi_test @ np.linalg.solve(a, phi.T @ np.asarray(y_train))
        quad = np.sum(phi_test * np.linalg.solve(a, phi_test.T).T, axis=1)
        return mean, noise2 * (1 + quad)

    header = (
        f"{'hyperparameters tuned by':<30}{'val NLL':>9}{'test RMSE':>11}"
        f"{'test NLL':>10}{'noise':>8}{'ampl.':>7}{'ℓ':>7}{'time [s]':>10}"
    )
    print(f"\n{header}\n{'-' * len(header)}")
    for name, (hyper, seconds) in results.items():
        mean, var = evaluate(hyper)
        mean_d, var_d = evaluate_dense(hyper)
        agree = max(
            float(np.max(np.abs(mean - mean_d)) / np.max(np.abs(mean_d))),
            float(np.max(np.abs(var - var_d)) / np.max(var_d)),
        )
        if agree > AGREEMENT:
            print(f"{name}: lstsq and dense predictions differ ({agree:.1e})")
            ok = False
        # Back to the original units (disease progression score).
        rmse = y_std * float(jnp.sqrt(jnp.mean((mean - y_test) ** 2)))
        nll = float(gaussian_nll(mean, var, y_test)) + np.log(y_std)
        print(
            f"{name:<30}{float(heldout_value_and_grad(hyper)[0]):>9.4f}{rmse:>11.2f}{nll:>10.4f}"
            f"{y_std * float(jnp.exp(hyper['log_noise'])):>8.1f}"
            f"{float(jnp.exp(hyper['log_amplitude'])):>7.2f}"
            f"{float(jnp.exp(hyper['log_lengthscale'])):>7.2f}"
            f"{seconds:>10.2f}"
        )
    print(
        "(RMSE, NLL and noise in the target's units; lengthscale in standard "
        "deviations of the inputs; tuning times exclude the first compilation)"
    )
    # Tuning on the held-out loss must improve the held-out loss.
    val_pred = float(heldout_value_and_grad(hyper_pred)[0])
    if not val_pred < float(heldout_value_and_grad(hyper0)[0]):
        print("tuning did not decrease the held-out NLL", file=sys.stderr)
        ok = False

    OUTDIR.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(trace_pred)
    ax[0].set(title="held-out NLL (through lstsq)", xlabel="Adam step")
    ax[1].plot(trace_ml)
    ax[1].set(title="negative log marginal likelihood / n", xlabel="Adam step")
    fig.tight_layout()
    fig.savefig(OUTDIR / "gp_hyperparameters.png", dpi=120)
    print(f"\nfigure: {OUTDIR / 'gp_hyperparameters.png'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
