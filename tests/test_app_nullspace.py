"""`mfa.nullspace_projection`: the null-space optax transformation.

Sign convention under test (documented in the docstring and on the docs page): the
transformation acts on optax *updates* $u$ (the steps added to the parameters) and
returns $u' = (I - J^+J)u - \\gamma J^+ c$, so that $J u' = -\\gamma c$.

Oracles: a dense pseudo-inverse (`numpy.linalg.pinv`) of the constraint Jacobian,
the linearised identity $J u' = -\\gamma c$, Newton convergence on a nonlinear
constraint, and the constraint violation along a training run.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import matfree_lstsq as mfl
from matfree_lstsq import applications as mfa


def projection_state(state, index=None) -> mfa.NullspaceProjectionState:
    """The transformation's state (`index`: its position in a chain's state)."""
    if index is not None:
        state = state[index]
    assert isinstance(state, mfa.NullspaceProjectionState)
    return state


def linear_problem(rank: int | None = None, dtype=jnp.float64, seed: int = 0):
    """Parameters `{"w": (3, 4), "b": (5,)}` (17 numbers) and the linear constraint
    `c(θ) = A vec(θ) − d` with 6 residuals, returned as a pytree `(c[:4], c[4:])`.
    With `rank`, `A = B C` has that rank (and `c` is not in its range)."""
    rng = np.random.default_rng(seed)
    m, n = 6, 17
    if rank is None:
        A = rng.standard_normal((m, n))
    else:
        A = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
    d = rng.standard_normal(m)
    params = {
        "w": jnp.asarray(rng.standard_normal((3, 4)), dtype),
        "b": jnp.asarray(rng.standard_normal(5), dtype),
    }
    updates = {
        "w": jnp.asarray(rng.standard_normal((3, 4)), dtype),
        "b": jnp.asarray(rng.standard_normal(5), dtype),
    }
    A_j, d_j = jnp.asarray(A, dtype), jnp.asarray(d, dtype)

    def constraint_fn(p):
        c = A_j @ ravel_pytree(p)[0] - d_j
        return (c[:4], c[4:])

    return A, d, params, updates, constraint_fn


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_linear_constraint_matches_dense_pseudoinverse(rate):
    A, d, params, updates, constraint_fn = linear_problem()
    transform = mfa.nullspace_projection(constraint_fn, correction_rate=rate)
    state = transform.init(params)
    new, state = jax.jit(transform.update)(updates, state, params)
    state = projection_state(state)

    theta = np.asarray(ravel_pytree(params)[0])
    u = np.asarray(ravel_pytree(updates)[0])
    u_new = np.asarray(ravel_pytree(new)[0])
    c = A @ theta - d
    A_pinv = np.linalg.pinv(A)
    expected = (np.eye(17) - A_pinv @ A) @ u - rate * A_pinv @ c
    np.testing.assert_allclose(u_new, expected, rtol=1e-8, atol=1e-9)
    # The sign convention: J u' = −γ c (A has full row rank), to solver tolerance.
    scale = np.linalg.norm(A) * np.linalg.norm(u_new) + np.linalg.norm(c)
    assert np.linalg.norm(A @ u_new + rate * c) <= 1e-9 * scale
    # The state reports ‖c(θ)‖ and the solve.
    np.testing.assert_allclose(state.constraint_norm, np.linalg.norm(c), rtol=1e-12)
    assert int(state.istop) in (1, 2, 4, 5)
    assert 1 <= int(state.num_steps) <= 6
    assert float(state.norm_r) <= 1e-9 * scale
    assert set(new) == {"w", "b"} and new["w"].shape == (3, 4)


def test_rank_deficient_constraint_is_minimum_norm():
    """Redundant constraints (rank 4 of 6, `c` not in range(J)): the update is
    still (I − J⁺J)u − γJ⁺c, and J u' = −γ J J⁺ c is the reachable part."""
    A, d, params, updates, constraint_fn = linear_problem(rank=4, seed=1)
    transform = mfa.nullspace_projection(constraint_fn, correction_rate=1.0)
    state = transform.init(params)
    new, state = transform.update(updates, state, params)
    theta = np.asarray(ravel_pytree(params)[0])
    u = np.asarray(ravel_pytree(updates)[0])
    c = A @ theta - d
    A_pinv = np.linalg.pinv(A, rcond=1e-10)
    expected = (np.eye(17) - A_pinv @ A) @ u - A_pinv @ c
    np.testing.assert_allclose(ravel_pytree(new)[0], expected, rtol=1e-7, atol=1e-8)


def test_float32():
    A, d, params, updates, constraint_fn = linear_problem(dtype=jnp.float32)
    transform = mfa.nullspace_projection(constraint_fn, correction_rate=1.0)
    state = transform.init(params)
    new, state = transform.update(updates, state, params)
    state = projection_state(state)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(new))
    assert state.constraint_norm.dtype == jnp.float32
    theta = np.asarray(ravel_pytree(params)[0], np.float64)
    u_new = np.asarray(ravel_pytree(new)[0], np.float64)
    A32 = np.asarray(A, np.float32).astype(np.float64)
    d32 = np.asarray(d, np.float32).astype(np.float64)
    c = A32 @ theta - d32
    scale = np.linalg.norm(A32) * np.linalg.norm(u_new) + np.linalg.norm(c)
    eps = float(np.finfo(np.float32).eps)
    assert np.linalg.norm(A32 @ u_new + c) <= 100 * eps * scale


def test_nonlinear_constraint_newton_convergence():
    """With zero incoming updates and γ = 1 the transformation is the Gauss–Newton
    iteration for c(θ) = 0: the violation falls quadratically to round-off."""
    params = {"w": jnp.asarray([[0.9, -0.3], [0.4, 1.2]]), "v": jnp.asarray([0.5])}

    def constraint_fn(p):
        # ‖w‖_F² = 2 and w₀₀·v = 1: two nonlinear residuals in a dict.
        return {
            "sphere": jnp.sum(p["w"] ** 2) - 2.0,
            "product": p["w"][0, 0] * p["v"] - 1.0,
        }

    transform = mfa.nullspace_projection(constraint_fn)
    state = projection_state(transform.init(params))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    update = jax.jit(transform.update)
    norms = [float(state.constraint_norm)]
    for _ in range(7):
        u, state = update(zeros, state, params)
        state = projection_state(state)
        params = optax.apply_updates(params, u)
        norms.append(float(state.constraint_norm))
    leaves = jax.tree_util.tree_leaves(constraint_fn(params))
    final = jnp.sqrt(sum(jnp.sum(x**2) for x in leaves))
    assert norms[0] > 0.1
    assert float(final) <= 1e-12
    # Quadratic convergence: once small, each step at least squares the violation
    # (up to a constant).
    small = [r for r in norms if r < 1e-2]
    assert len(small) >= 2
    assert small[1] <= 10 * small[0] ** 2


def mlp(params, x):
    h = jnp.tanh(x @ params["W1"] + params["b1"])
    return h @ params["W2"] + params["b2"]


def test_constrained_training_keeps_constraints():
    """RMSprop (a coordinate-wise rescaling, like Adam; optax's Adam does not run
    under the strict dtype promotion of this test suite), then the projection (last
    in the chain): a fixed half of the first
    layer's weights is zero and the output weights sum to one. The violation falls
    geometrically during warm-up (γ = 0.5 halves it each step, starting from a dense
    initialisation), stays ≤ 1e-6 afterwards, and the loss decreases."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-2, 2, (128, 2)))
    y = jnp.sin(x[:, :1]) * jnp.cos(x[:, 1:])
    params = {
        "W1": jnp.asarray(rng.standard_normal((2, 16))),
        "b1": jnp.zeros(16),
        "W2": jnp.asarray(rng.standard_normal((16, 1)) / 4),
        "b2": jnp.zeros(1),
    }
    mask = jnp.asarray(rng.permutation(32).reshape(2, 16) < 16)

    def constraint_fn(p):
        return (p["W1"][mask], jnp.sum(p["W2"], keepdims=True)[0] - 1.0)

    def violation(p):
        return jnp.sqrt(sum(jnp.sum(c**2) for c in constraint_fn(p)))

    def loss(p):
        return jnp.mean((mlp(p, x) - y) ** 2)

    optimiser = optax.chain(
        optax.rmsprop(1e-2),
        mfa.nullspace_projection(constraint_fn, correction_rate=0.5),
    )

    def step(carry, _):
        p, opt_state = carry
        value, grads = jax.value_and_grad(loss)(p)
        updates, opt_state = optimiser.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        norm = projection_state(opt_state, 1).constraint_norm
        return (p, opt_state), (value, violation(p), norm)

    (params, _), (losses, violations, reported) = jax.jit(
        lambda p: jax.lax.scan(step, (p, optimiser.init(p)), length=400)
    )(params)
    warmup = 40  # 0.5**40 ≈ 1e-12
    assert float(violations[0]) > 0.1
    assert float(jnp.max(violations[warmup:])) <= 1e-6
    # The state's constraint norm is the violation at the parameters it was given.
    np.testing.assert_allclose(reported[1:], violations[:-1], rtol=1e-10, atol=1e-14)
    # Training makes progress on the constraint set.
    assert float(losses[-1]) < 0.5 * float(losses[warmup])
    assert float(jnp.mean(losses[-50:])) < float(jnp.mean(losses[warmup : warmup + 50]))
    assert float(jnp.max(jnp.abs(params["W1"][mask]))) <= 1e-12
    print(f"violation after warm-up ≤ {float(jnp.max(violations[warmup:])):.2e}")


# ---------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------


def test_bad_input():
    _, _, params, updates, constraint_fn = linear_problem()
    good = mfa.nullspace_projection(constraint_fn)
    state = good.init(params)

    with pytest.raises(ValueError, match=r"updates.*structure.*params"):
        good.update({"w": updates["w"]}, state, params)
    with pytest.raises(ValueError, match=r"updates.*structure.*float64\[5\]"):
        good.update({"w": updates["w"], "b": jnp.ones(4)}, state, params)
    with pytest.raises(ValueError, match="params"):
        good.update(updates, state)

    bad_outputs = {
        "empty": (lambda p: (), ValueError, "empty"),
        "integer": (lambda p: jnp.ones(3, jnp.int32), TypeError, "dtype"),
        "float32": (
            lambda p: p["b"].astype(jnp.float32),
            TypeError,
            r"dtype of `params` \(float64\).*float32\[5\]",
        ),
        "string": (lambda p: ["not a residual"], TypeError, "pytree of arrays"),
    }
    for fn, error, match in bad_outputs.values():
        transform = mfa.nullspace_projection(fn)
        with pytest.raises(error, match=match):
            transform.init(params)
        with pytest.raises(error, match=match):
            transform.update(updates, state, params)

    with pytest.raises(TypeError, match="params"):
        good.init({"w": jnp.ones(3, jnp.int32)})
    with pytest.raises(ValueError, match="correction_rate"):
        mfa.nullspace_projection(constraint_fn, correction_rate=-1.0)
    with pytest.raises(ValueError, match="correction_rate"):
        mfa.nullspace_projection(constraint_fn, correction_rate=float("nan"))
    with pytest.raises(TypeError, match="correction_rate"):
        mfa.nullspace_projection(constraint_fn, correction_rate="1")  # type: ignore
    with pytest.raises(TypeError, match="solver"):
        mfa.nullspace_projection(constraint_fn, solver=optax.sgd(1.0))  # type: ignore
    with pytest.raises(TypeError, match="constraint_fn"):
        mfa.nullspace_projection(3.0)  # type: ignore[arg-type]
    # The solver is configurable.
    lsqr = mfa.nullspace_projection(constraint_fn, solver=mfl.LSQR(atol=1e-12))
    lsqr.update(updates, lsqr.init(params), params)


def test_optax_is_optional():
    """Without optax the package imports; the transformation says how to install it."""
    code = (
        "import sys; sys.modules['optax'] = None\n"
        "from matfree_lstsq import applications as mfa\n"
        "try:\n"
        "    mfa.nullspace_projection(lambda p: p)\n"
        "except ImportError as e:\n"
        "    assert 'pip install \"matfree-lstsq[applications]\"' in str(e), e\n"
        "    print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
