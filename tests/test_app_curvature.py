"""`mfa.scalar_curvature`: the scalar curvature of the graph of a loss.

Oracles, all independent of the implementation's Hessian-vector-product formula:

- the dense formula, from `jax.hessian` and `jax.grad` in the test;
- an intrinsic computation from the induced metric alone, $G = I + \\nabla L \\nabla
  L^\\mathsf{T}$: Christoffel symbols → Riemann tensor → Ricci tensor → trace with
  $G^{-1}$ (Gauss' equation is not used);
- closed forms: $2\\det H/\\beta^2$ for two parameters (twice the Gaussian
  curvature), and $\\sum_{i\\neq j}\\lambda_i\\lambda_j$ at a critical point;
- for Hutchinson's estimator, the exact value on a ~1000-parameter network, against
  the spread of the estimates over seeds.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matfree_lstsq import applications as mfa


# ---------------------------------------------------------------------------------
# Random smooth functions and the intrinsic oracle
# ---------------------------------------------------------------------------------


def smooth_function(coeffs, theta):
    """A smooth, non-polynomial function with O(1) derivatives of every order: sums
    of sines, a quadratic form, a cubic and an exponential."""
    w, a, b, q, u, c = coeffs
    return (
        jnp.dot(a, jnp.sin(w @ theta + b))
        + 0.5 * theta @ q @ theta
        + (u @ theta) ** 3 / 6
        + jnp.exp(0.3 * (c @ theta))
    )


def random_function(n: int, seed: int):
    """Seeded coefficients of `smooth_function` in `n` parameters, and a point."""
    rng = np.random.default_rng(seed)
    coeffs = (
        rng.standard_normal((6, n)),
        rng.standard_normal(6),
        rng.standard_normal(6),
        rng.standard_normal((n, n)),
        rng.standard_normal(n),
        rng.standard_normal(n) / np.sqrt(n),
    )
    theta = rng.standard_normal(n) * 0.7
    return tuple(jnp.asarray(c) for c in coeffs), jnp.asarray(theta)


def intrinsic_scalar_curvature(f, theta):
    """Scalar curvature of the metric $G_{ij} = \\delta_{ij} + \\partial_i f\\,
    \\partial_j f$ from its Christoffel symbols (textbook definitions, autodiff for
    every partial derivative)."""
    n = theta.shape[0]
    grad = jax.grad(f)

    def metric(x):
        g = grad(x)
        return jnp.eye(n, dtype=x.dtype) + jnp.outer(g, g)

    def christoffel(x):
        # Γ^k_ij = ½ G^{kl} (∂_i G_jl + ∂_j G_il − ∂_l G_ij);  dG[a, b, c] = ∂_c G_ab.
        G = metric(x)
        dG = jax.jacfwd(metric)(x)
        lowered = 0.5 * (
            jnp.einsum("jli->ijl", dG)
            + jnp.einsum("ilj->ijl", dG)
            - jnp.einsum("ijl->ijl", dG)
        )
        return jnp.einsum("kl,ijl->kij", jnp.linalg.inv(G), lowered)

    gamma = christoffel(theta)
    d_gamma = jax.jacfwd(christoffel)(theta)  # d_gamma[k, i, j, m] = ∂_m Γ^k_ij
    # R^ρ_σμν = ∂_μ Γ^ρ_νσ − ∂_ν Γ^ρ_μσ + Γ^ρ_μλ Γ^λ_νσ − Γ^ρ_νλ Γ^λ_μσ
    riemann = (
        jnp.einsum("rnsm->rsmn", d_gamma)
        - jnp.einsum("rmsn->rsmn", d_gamma)
        + jnp.einsum("rml,lns->rsmn", gamma, gamma)
        - jnp.einsum("rnl,lms->rsmn", gamma, gamma)
    )
    ricci = jnp.einsum("rsrn->sn", riemann)  # R_σν = R^ρ_σρν
    return jnp.einsum("sn,sn->", jnp.linalg.inv(metric(theta)), ricci)


def dense_formula(f, theta):
    g = jax.grad(f)(theta)
    H = jax.hessian(f)(theta)
    beta = 1 + g @ g
    tr = jnp.trace(H)
    return (tr**2 - jnp.trace(H @ H)) / beta - 2 * (
        tr * (g @ H @ g) - g @ H @ H @ g
    ) / beta**2


# ---------------------------------------------------------------------------------
# Exact method
# ---------------------------------------------------------------------------------


@jax.jit
def exact_and_oracles(coeffs, theta):
    f = functools.partial(smooth_function, coeffs)
    S, info = mfa.scalar_curvature(f, theta)
    g = jax.grad(f)(theta)
    H = jax.hessian(f)(theta)
    oracles = dict(
        dense=dense_formula(f, theta),
        intrinsic=intrinsic_scalar_curvature(f, theta),
        trace_h=jnp.trace(H),
        trace_h2=jnp.sum(H * H),
        g_h_g=g @ H @ g,
        norm_hg2=jnp.sum((H @ g) ** 2),
        norm_g=jnp.linalg.norm(g),
        det=jnp.linalg.det(H) if theta.shape[0] == 2 else jnp.nan,
    )
    return S, info, oracles


@pytest.mark.parametrize("n", [3, 4, 5])
def test_exact_matches_dense_formula_and_intrinsic_curvature(n):
    for seed in range(2):
        S, info, oracle = exact_and_oracles(*random_function(n, seed))
        # Not degenerate (S is not ~0), so the relative check means something.
        assert abs(float(oracle["intrinsic"])) > 1e-3
        np.testing.assert_allclose(S, oracle["dense"], rtol=1e-10, atol=0)
        np.testing.assert_allclose(S, oracle["intrinsic"], rtol=1e-10, atol=0)
        # The reported ingredients are those of the dense Hessian.
        for name in ("trace_h", "trace_h2", "g_h_g", "norm_hg2", "norm_g"):
            np.testing.assert_allclose(getattr(info, name), oracle[name], rtol=1e-12)
        assert float(info.stderr) == 0.0


def test_exact_on_pytree_params():
    """A dict of arrays gives the curvature of the same function of the raveled
    vector."""
    coeffs, theta = random_function(5, seed=7)
    f = functools.partial(smooth_function, coeffs)

    def f_tree(p):
        return f(jnp.concatenate([p["a"].reshape(-1), p["b"]]))

    params = {"a": theta[:4].reshape(2, 2), "b": theta[4:]}
    S_tree, _ = mfa.scalar_curvature(f_tree, params)
    S_flat, _ = mfa.scalar_curvature(f, theta)
    np.testing.assert_allclose(S_tree, S_flat, rtol=1e-12)


def test_two_parameters_is_twice_gaussian_curvature():
    for seed in range(3):
        S, info, oracle = exact_and_oracles(*random_function(2, seed))
        beta = 1 + info.norm_g**2
        expected = 2 * oracle["det"] / beta**2
        assert abs(float(expected)) > 1e-3
        np.testing.assert_allclose(S, expected, rtol=1e-11)
        np.testing.assert_allclose(S, oracle["intrinsic"], rtol=1e-10)


def test_critical_point_is_sum_of_eigenvalue_products():
    """At θ = 0 the gradient vanishes (the cubic and quartic terms have zero
    gradient there) and S = Σ_{i≠j} λ_i λ_j over the eigenvalues of H."""
    n = 5
    rng = np.random.default_rng(3)
    Q = rng.standard_normal((n, n))
    A = (Q + Q.T) / 2  # indefinite
    u = jnp.asarray(rng.standard_normal(n))
    A_j = jnp.asarray(A)

    def f(theta):
        return 0.5 * theta @ A_j @ theta + (u @ theta) ** 3 + jnp.sum(theta**4)

    S, info = mfa.scalar_curvature(f, jnp.zeros(n))
    assert float(info.norm_g) == 0.0
    lam = np.linalg.eigvalsh(A)
    expected = np.sum(np.outer(lam, lam)) - np.sum(lam**2)
    np.testing.assert_allclose(S, expected, rtol=1e-12)
    # A round sphere of radius r, graph of −√(r² − ‖θ‖²) near its bottom, has
    # S = n(n−1)/r² everywhere: check a non-critical point too.
    r = 2.0
    sphere = lambda t: -jnp.sqrt(r**2 - t @ t)
    theta = jnp.asarray(rng.uniform(-0.6, 0.6, n))
    S_sphere, _ = mfa.scalar_curvature(sphere, theta)
    np.testing.assert_allclose(S_sphere, n * (n - 1) / r**2, rtol=1e-12)


def test_float32():
    coeffs, theta = random_function(4, seed=1)
    f = functools.partial(smooth_function, coeffs)
    S64, _ = mfa.scalar_curvature(f, theta)
    f32 = lambda t: f(t.astype(jnp.float64)).astype(jnp.float32)
    S32, info = mfa.scalar_curvature(f32, theta.astype(jnp.float32))
    assert S32.dtype == jnp.float32
    assert info.trace_h.dtype == jnp.float32
    np.testing.assert_allclose(S32, S64, rtol=1e-4)


# ---------------------------------------------------------------------------------
# Hutchinson's estimator on a ~1000-parameter network
# ---------------------------------------------------------------------------------


def mlp_loss():
    """Mean squared error of a 10-40-15-1 tanh network (1071 parameters) on 64
    Gaussian inputs, away from a critical point."""
    sizes = [10, 40, 15, 1]
    rng = np.random.default_rng(0)
    params = [
        (
            jnp.asarray(rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)),
            jnp.asarray(0.1 * rng.standard_normal(fan_out)),
        )
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:])
    ]
    x_np = rng.standard_normal((64, sizes[0]))
    x = jnp.asarray(x_np)
    y = jnp.asarray(np.sin(x_np[:, 0]) + x_np[:, 1] * x_np[:, 2])

    def loss(p):
        h = x
        for i, (W, b) in enumerate(p):
            h = h @ W + b
            if i < len(p) - 1:
                h = jnp.tanh(h)
        return jnp.mean((h[:, 0] - y) ** 2)

    return loss, params


@functools.cache
def hutchinson_runs():
    loss, params = mlp_loss()
    num_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    exact = mfa.scalar_curvature(loss, params)
    keys = jax.random.split(jax.random.key(1), 64)

    @jax.jit
    @jax.vmap
    def estimate(key):
        return mfa.scalar_curvature(
            loss, params, method="hutchinson", num_probes=32, key=key
        )

    return num_params, exact, estimate(keys)


def test_hutchinson_unbiased_on_network():
    num_params, (S_exact, info_exact), (S_est, info_est) = hutchinson_runs()
    assert 900 <= num_params <= 1200
    seeds = S_est.shape[0]
    mean = float(jnp.mean(S_est))
    sem = float(jnp.std(S_est, ddof=1)) / np.sqrt(seeds)
    print(f"exact {float(S_exact):.6g}, Hutchinson mean {mean:.6g} ± {sem:.3g}")
    # The estimate is random (its spread is not negligible) but centred on S.
    assert sem > 0
    assert abs(mean - float(S_exact)) <= 4 * sem
    # The same for the trace estimate.
    tr_mean = float(jnp.mean(info_est.trace_h))
    tr_sem = float(jnp.std(info_est.trace_h, ddof=1)) / np.sqrt(seeds)
    assert abs(tr_mean - float(info_exact.trace_h)) <= 4 * tr_sem
    tr2_mean = float(jnp.mean(info_est.trace_h2))
    tr2_sem = float(jnp.std(info_est.trace_h2, ddof=1)) / np.sqrt(seeds)
    assert abs(tr2_mean - float(info_exact.trace_h2)) <= 4 * tr2_sem
    # gᵀHg, ‖Hg‖² and ‖g‖ are computed exactly by both methods.
    for name in ("g_h_g", "norm_hg2", "norm_g"):
        np.testing.assert_allclose(
            getattr(info_est, name), getattr(info_exact, name), rtol=1e-10
        )


def test_hutchinson_standard_error_matches_spread():
    """The reported standard error of one estimate is the spread of the estimates
    over seeds. With 64 seeds the sample standard deviation is within ±35% of the
    truth at about four of its own standard errors (1/√(2·63) ≈ 9%)."""
    _, _, (S_est, info_est) = hutchinson_runs()
    spread = float(jnp.std(S_est, ddof=1))
    reported = float(jnp.sqrt(jnp.mean(info_est.stderr**2)))
    print(f"spread over seeds {spread:.4g}, reported stderr (rms) {reported:.4g}")
    assert 0.65 * spread <= reported <= 1.35 * spread
    spread_tr = float(jnp.std(info_est.trace_h, ddof=1))
    reported_tr = float(jnp.sqrt(jnp.mean(info_est.trace_h_stderr**2)))
    assert 0.65 * spread_tr <= reported_tr <= 1.35 * spread_tr


# ---------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------


def test_bad_input():
    theta = jnp.ones(3)
    f = lambda t: jnp.sum(t**2)
    with pytest.raises(ValueError, match=r"loss_fn.*scalar.*float64\[3\]"):
        mfa.scalar_curvature(lambda t: t**2, theta)
    with pytest.raises(ValueError, match=r"loss_fn.*scalar"):
        mfa.scalar_curvature(lambda t: (jnp.sum(t), jnp.sum(t)), theta)  # type: ignore
    with pytest.raises(TypeError, match=r"loss_fn.*dtype"):
        mfa.scalar_curvature(lambda t: jnp.sum(t).astype(jnp.float32), theta)
    with pytest.raises(TypeError, match="callable"):
        mfa.scalar_curvature(3.0, theta)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"params.*int"):
        mfa.scalar_curvature(f, jnp.arange(3))
    with pytest.raises(TypeError, match=r"params.*one dtype"):
        mfa.scalar_curvature(
            lambda p: jnp.sum(p[0]) + jnp.sum(p[1]).astype(jnp.float64),
            (jnp.ones(2), jnp.ones(2, jnp.float32)),
        )
    with pytest.raises(ValueError, match="method"):
        mfa.scalar_curvature(f, theta, method="lanczos")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key"):
        mfa.scalar_curvature(f, theta, method="hutchinson")
    with pytest.raises(ValueError, match="num_probes"):
        mfa.scalar_curvature(
            f, theta, method="hutchinson", num_probes=3, key=jax.random.key(0)
        )
