"""Derivatives of `lstsq` (DESIGN.md §4) against dense oracles (§7).

Oracles, all float64 and differentiated by JAX itself:

- damped: the normal equations `(AᵀA + λ²I) x = Aᵀb + λ²x0`;
- undamped: `x = x0 + P (b − A x0)` with `P` the pseudo-inverse truncated to the
  known rank through an SVD, so its derivative is the fixed-rank one (rank-deficient
  problems are `A = B C`, perturbed through `B` and `C`, never by zeroing entries);
- finite differences where no closed form is convenient (Hessians, `∂/∂damp`).

Each test compiles one function that returns the value, a JVP and a VJP together;
tolerances are relative (`‖got − want‖ / ‖want‖`, with a floor for zero oracles).
Random directions use seeds unrelated to the problems' (a direction drawn from the
same stream as `A`'s factors can be degenerate, e.g. preserve its range).
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import pytest
from helpers import (
    dense_problem,
    orthogonal_to,
    pytree_function_operator,
    pytree_operator as pytree_matrix_operator,
)
from jax.flatten_util import ravel_pytree

import matfree_lstsq as mfl


MAX_STEPS = 200
SOLVERS = {
    "lsmr": mfl.LSMR(atol=1e-12, btol=1e-12, max_steps=MAX_STEPS),
    "lsqr": mfl.LSQR(atol=1e-12, btol=1e-12, max_steps=MAX_STEPS),
}
LSMR = SOLVERS["lsmr"]
SHAPES = {"tall": (12, 5), "wide": (5, 12), "square": (6, 6)}
RTOL = 1e-7


# ---------------------------------------------------------------------------------
# Oracles and utilities
# ---------------------------------------------------------------------------------


def damped_oracle(A, b, damp, x0=None):
    """`argmin ‖Ax − b‖² + λ²‖x − x0‖²` from the normal equations."""
    n = A.shape[1]
    rhs = A.T @ b if x0 is None else A.T @ b + damp**2 * x0
    return jnp.linalg.solve(A.T @ A + damp**2 * jnp.eye(n, dtype=A.dtype), rhs)


def truncated_pinv(A, rank):
    """The pseudo-inverse of the best rank-`rank` approximation of `A` (SVD)."""
    U, s, Vt = jnp.linalg.svd(A, full_matrices=False)
    return (Vt[:rank].T / s[:rank]) @ U[:, :rank].T


def undamped_oracle(A, b, x0=None, rank=None):
    """`x0 + A⁺(b − A x0)`, with `A⁺` truncated to `rank` (default: full rank)."""
    P = truncated_pinv(A, min(A.shape) if rank is None else rank)
    return P @ b if x0 is None else x0 + P @ (b - A @ x0)


def rel_err(got, want, floor=1e-3):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), floor))


def assert_close(got, want, rtol=RTOL, floor=1e-3, what=""):
    """Leaf by leaf relative error ≤ `rtol`; the pytree structures must agree."""
    got_leaves, got_def = jtu.tree_flatten_with_path(got)
    want_leaves, want_def = jtu.tree_flatten_with_path(want)
    assert got_def == want_def, (got_def, want_def)
    for (path, g), (_, w) in zip(got_leaves, want_leaves):
        assert np.all(np.isfinite(np.asarray(g))), (
            f"{what}{jtu.keystr(path)}: not finite"
        )
        err = rel_err(g, w, floor)
        assert err <= rtol, f"{what}{jtu.keystr(path)}: relative error {err:.2e}"


def random_like(rng, tree):
    return jtu.tree_map(lambda x: jnp.asarray(rng.standard_normal(jnp.shape(x))), tree)


@functools.partial(jax.jit, static_argnums=0)
def value_jvp_vjp(fn, primals, tangents, cotangent):
    """`fn(*primals)`, its JVP along `tangents` and its VJP of `cotangent`."""
    value, tangent = jax.jvp(fn, primals, tangents)
    _, vjp = jax.vjp(fn, *primals)
    return value, tangent, vjp(cotangent)


def check_against_oracle(fn, oracle, primals, *, seed=1234, rtol=RTOL):
    """Value, JVP (all inputs perturbed at once) and VJP (every input) of `fn`
    against those of `oracle`."""
    rng = np.random.default_rng(seed)
    tangents = random_like(rng, primals)
    cotangent = random_like(rng, oracle(*primals))
    got = value_jvp_vjp(fn, primals, tangents, cotangent)
    want = value_jvp_vjp(oracle, primals, tangents, cotangent)
    for name, g, w in zip(("value", "jvp", "vjp"), got, want):
        assert_close(g, w, rtol, what=f"{name}")
    return got, want


def inconsistent(p, seed, factor=0.1):
    """`p.b` plus a component orthogonal to range(A) of norm `factor·‖p.b‖`."""
    g = orthogonal_to(p.basis, np.random.default_rng(seed).standard_normal(len(p.b)))
    return p.b + g * (factor * np.linalg.norm(p.b) / np.linalg.norm(g))


def full_rank_problem(shape, seed=0):
    """Well-conditioned (cond 10) `A`, an inconsistent `b` when `A` is tall, and a
    non-zero `x0`."""
    m, n = shape
    p = dense_problem(m, n, cond=10.0, seed=seed, consistent=m <= n)
    x0 = np.random.default_rng(seed + 2).standard_normal(n)
    return jnp.asarray(p.A), jnp.asarray(p.b), jnp.asarray(x0)


def factors(m, n, rank, seed=0):
    """`B` (m × rank), `C` (rank × n) with `B C` of exact rank `rank`, a generic
    (so inconsistent) `b` and a non-zero `x0`."""
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((m, rank))
    C = rng.standard_normal((rank, n))
    b = rng.standard_normal(m)
    x0 = rng.standard_normal(n)
    return tuple(map(jnp.asarray, (B, C, b, x0)))


# ---------------------------------------------------------------------------------
# First order: value, JVP, VJP against dense oracles
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_undamped_full_rank(shape):
    """Tall (inconsistent), wide and square well-conditioned problems, x0 ≠ 0:
    derivatives with respect to A, b and x0 (LSMR; LSQR's undamped rule is checked
    on rank-deficient and lineax problems)."""
    A, b, x0 = full_rank_problem(SHAPES[shape])
    fn = lambda A, b, x0: mfl.lstsq(A, b, LSMR, x0=x0).value
    got, want = check_against_oracle(fn, undamped_oracle, (A, b, x0))
    x0_bar = got[2][2]
    if shape in ("tall", "square"):
        # Full column rank: x0 does not change the solution.
        assert float(jnp.linalg.norm(x0_bar)) < 1e-8
    else:
        # A null space: the solution is the one closest to x0.
        assert float(jnp.linalg.norm(x0_bar)) > 0.1


@pytest.mark.parametrize(
    "solver, shape, consistent",
    [
        ("lsmr", (10, 6), False),
        ("lsmr", (6, 10), False),
        ("lsqr", (6, 10), False),
        ("lsmr", (10, 6), True),
    ],
    ids=["lsmr-tall", "lsmr-wide", "lsqr-wide", "lsmr-tall-consistent"],
)
def test_undamped_rank_deficient(solver, shape, consistent):
    """A = B C of rank 2, x0 ≠ 0 and an inconsistent b: all three Golub–Pereyra
    terms are non-zero. (With a consistent b the rule skips the residual term's
    solve at run time.) Derivatives with respect to B, C, b and x0."""
    S = SOLVERS[solver]
    rank = 2
    B, C, b, x0 = factors(*shape, rank, seed=3)
    if consistent:
        b = B @ (C @ x0[::-1])
    assert np.linalg.matrix_rank(np.asarray(B @ C)) == rank
    fn = lambda B, C, b, x0: mfl.lstsq(B @ C, b, S, x0=x0).value
    oracle = lambda B, C, b, x0: undamped_oracle(B @ C, b, x0, rank)
    # The oracle is a genuine rank-deficient pseudo-inverse: the untruncated
    # `jnp.linalg.pinv` agrees on the value.
    np.testing.assert_allclose(
        oracle(B, C, b, x0),
        x0 + jnp.linalg.pinv(B @ C) @ (b - B @ C @ x0),
        rtol=1e-10,
    )
    check_against_oracle(fn, oracle, (B, C, b, x0))


@pytest.mark.parametrize(
    "solver, shape",
    [("lsmr", "tall"), ("lsqr", "square")],
)
def test_damped_with_x0(solver, shape):
    """λ > 0 (traced), x0 ≠ 0: derivatives with respect to A, b, x0 and λ."""
    S = SOLVERS[solver]
    A, b, x0 = full_rank_problem(SHAPES[shape], seed=4)
    damp = jnp.asarray(0.3)
    fn = lambda A, b, x0, d: mfl.lstsq(A, b, S, damp=d, x0=x0).value
    oracle = lambda A, b, x0, d: damped_oracle(A, b, d, x0)
    got, _ = check_against_oracle(fn, oracle, (A, b, x0, damp))
    # ∂/∂x0 and ∂/∂λ are genuinely non-zero here (peers get them wrong).
    _, _, x0_bar, damp_bar = got[2]
    assert float(jnp.linalg.norm(x0_bar)) > 1e-2
    assert abs(float(damp_bar)) > 1e-3
    # The oracle's ∂/∂λ itself, against central differences of the oracle.
    rng = np.random.default_rng(0)
    ct = jnp.asarray(rng.standard_normal(A.shape[1]))
    h = 1e-5
    fd = (oracle(A, b, x0, damp + h) - oracle(A, b, x0, damp - h)) @ ct / (2 * h)
    grad = jax.grad(lambda d: oracle(A, b, x0, d) @ ct)(damp)
    assert abs(float(fd - grad)) <= 1e-7 * abs(float(grad))


def _ill_conditioned(seed=3):
    """60 × 20, cond 1e3, ‖A‖ = 1, inconsistent right-hand side."""
    p = dense_problem(60, 20, cond=1e3, seed=seed)
    A, b = jnp.asarray(p.A), jnp.asarray(inconsistent(p, seed + 100))
    x0 = jnp.asarray(np.random.default_rng(seed + 200).standard_normal(20))
    return A, b, x0


def test_damp_sweep():
    """λ from 1e-8·‖A‖ to 1e2·‖A‖ on an
    ill-conditioned, inconsistent 60 × 20 problem; derivatives w.r.t. A, b, x0, λ."""
    S = LSMR
    A, b, x0 = _ill_conditioned()
    norm_a = float(jnp.linalg.norm(A, 2))
    fn = lambda A, b, x0, d: mfl.lstsq(A, b, S, damp=d, x0=x0).value
    oracle = lambda A, b, x0, d: damped_oracle(A, b, d, x0)
    for relative in (1e-8, 1e-6, 1e-4, 1e-2, 1.0, 1e2):
        damp = jnp.asarray(relative * norm_a)
        check_against_oracle(fn, oracle, (A, b, x0, damp))


@jax.jit
def _closed_form_jvp(A, b, damp, A_dot):
    """The damped one-solve rule for ẋ along Ȧ, done by hand:
    `ẋ = K⁺(−Ȧx, Ȧᵀr/λ)` with `K = [A; λI]`."""
    x = mfl.lstsq(A, b, LSMR, damp=damp).value
    r = b - A @ x
    K = lx.FunctionLinearOperator(
        lambda v: (A @ v, damp * v), jax.ShapeDtypeStruct(x.shape, x.dtype)
    )
    return lx.linear_solve(K, (-A_dot @ x, A_dot.T @ r / damp), LSMR).value


@jax.jit
def _library_jvp(A, b, damp, A_dot):
    return jax.jvp(lambda A: mfl.lstsq(A, b, LSMR, damp=damp).value, (A,), (A_dot,))[1]


@jax.jit
def _oracle_jvp(A, b, damp, A_dot):
    return jax.jvp(lambda A: damped_oracle(A, b, damp), (A,), (A_dot,))[1]


@pytest.mark.parametrize("case", ["moderate", "tiny_consistent", "tiny_inconsistent"])
def test_damped_rule_paths(case):
    """The one-solve closed form `K⁺(−Ȧx, Ȧᵀr/λ)` is accurate for moderate λ (and
    for tiny λ when b is consistent); for tiny λ with an inconsistent b it is not,
    while the library's rule (which never divides a block by λ) is accurate in all
    three cases. Several directions Ȧ, since the closed form's error depends on
    where the solver happens to stop."""
    A, b, _ = _ill_conditioned()
    if case == "tiny_consistent":
        b = A @ jnp.asarray(np.random.default_rng(1).standard_normal(20))
    relative = 1e-1 if case == "moderate" else 1e-8
    damp = jnp.asarray(relative * float(jnp.linalg.norm(A, 2)))
    library, by_hand = [], []
    for seed in range(8):
        A_dot = jnp.asarray(np.random.default_rng(100 + seed).standard_normal(A.shape))
        want = _oracle_jvp(A, b, damp, A_dot)
        library.append(rel_err(_library_jvp(A, b, damp, A_dot), want))
        by_hand.append(rel_err(_closed_form_jvp(A, b, damp, A_dot), want))
    assert max(library) <= RTOL
    if case == "tiny_inconsistent":
        # This problem is hard enough that the one-solve formula fails here.
        assert max(by_hand) > 1e-6
    else:
        assert max(by_hand) <= RTOL


# ---------------------------------------------------------------------------------
# Higher order and transformations
# ---------------------------------------------------------------------------------


def _sin_sum(x):
    return jnp.sum(jnp.sin(x)) + 0.5 * jnp.sum(x**2)


def _hessian_loss(case):
    """A scalar function of the solution, of θ that moves A (through rank-preserving
    factors when A is rank-deficient), b and, for "damp_traced", λ; with the same
    function of the dense oracle."""
    rng = np.random.default_rng(500)
    if case == "undamped_rank_deficient":
        B, C, b0, _ = factors(8, 5, 2, seed=5)
        E, F = random_like(rng, (B, C))
        e = jnp.asarray(rng.standard_normal(8))

        def loss(theta, oracle=False):
            A = (B + theta[0] * E) @ (C + theta[1] * F)
            b = b0 + theta[2] * e
            x = undamped_oracle(A, b, rank=2) if oracle else mfl.lstsq(A, b, LSMR).value
            return _sin_sum(x)

        return loss, jnp.asarray([0.1, -0.2, 0.3])

    A0, b0, x0 = full_rank_problem((8, 5), seed=5)
    E, F = random_like(rng, (A0, A0))
    e = jnp.asarray(rng.standard_normal(8))

    def loss(theta, oracle=False):
        A = A0 + theta[0] * E + theta[1] * F
        b, d = b0 + theta[2] * e, theta[3]
        if oracle:
            return _sin_sum(damped_oracle(A, b, d, x0))
        return _sin_sum(mfl.lstsq(A, b, LSMR, damp=d, x0=x0).value)

    return loss, jnp.asarray([0.1, -0.2, 0.3, 0.4])


@pytest.mark.parametrize("case", ["undamped_rank_deficient", "damp_traced"])
def test_hessian_matches_finite_differences(case):
    """`jax.hessian` against central differences (step 1e-5) of `jax.grad`: the
    undamped rule on a rank-deficient A (all three Golub–Pereyra terms), and the
    damped rules with λ among the variables. The gradient is checked against the
    oracle's at every point the differences use, so they are those of the true
    gradient. (Forward over reverse with a static λ is `test_jvp_of_grad`.)"""
    loss, theta = _hessian_loss(case)
    hessian = jax.jit(jax.hessian(loss))(theta)
    grad = jax.jit(jax.grad(loss))
    oracle_grad = jax.jit(jax.grad(functools.partial(loss, oracle=True)))
    h = 1e-5
    steps = h * jnp.eye(theta.size, dtype=theta.dtype)
    for point in [theta, *(theta + steps), *(theta - steps)]:
        assert rel_err(grad(point), oracle_grad(point)) <= 1e-9
    fd = jnp.stack(
        [(grad(theta + v) - grad(theta - v)) / (2 * h) for v in steps], axis=1
    )
    assert rel_err(hessian, fd) <= 1e-6
    assert rel_err(hessian, hessian.T) <= 1e-9
    assert float(jnp.linalg.norm(hessian)) > 0.1


@pytest.mark.parametrize("damp", [0.0, "traced"], ids=["undamped", "damp_traced"])
def test_grad_of_grad(damp):
    """∂/∂A of ‖∂f/∂b‖², against the dense oracle: undamped, and λ traced (the rule
    picked at run time; λ = 0.5 runs the damped rule)."""
    A, b, _ = full_rank_problem((8, 5), seed=6)
    d = jnp.asarray(0.5) if damp == "traced" else damp

    def outer(solve):
        inner = jax.grad(lambda A, b, d: _sin_sum(solve(A, b, d)), argnums=1)
        return jax.jit(jax.grad(lambda A, b, d: jnp.sum(inner(A, b, d) ** 2)))

    if damp == "traced":
        got = outer(lambda A, b, d: mfl.lstsq(A, b, LSMR, damp=d).value)(A, b, d)
    else:
        got = outer(lambda A, b, _: mfl.lstsq(A, b, LSMR, damp=damp).value)(A, b, d)
    want = outer(lambda A, b, d: damped_oracle(A, b, d))(A, b, d)
    assert_close(got, want)


def test_jvp_of_grad():
    """Forward over reverse (damped; the Hessian test covers the undamped rule): the
    JVP of (∂f/∂A, ∂f/∂b) along (Ȧ, ḃ), against the dense oracle."""
    A, b, _ = full_rank_problem((8, 5), seed=7)
    tangents = random_like(np.random.default_rng(700), (A, b))

    def jvp_of_grad(solve):
        grad = jax.grad(lambda A, b: _sin_sum(solve(A, b)), argnums=(0, 1))
        return jax.jit(lambda A, b: jax.jvp(grad, (A, b), tangents))

    got = jvp_of_grad(lambda A, b: mfl.lstsq(A, b, LSMR, damp=0.5).value)(A, b)
    want = jvp_of_grad(lambda A, b: damped_oracle(A, b, 0.5))(A, b)
    assert_close(got, want)


@functools.partial(jax.jit, static_argnums=2)
def _grad_sin(A, b, damp):
    loss = lambda A, b: _sin_sum(mfl.lstsq(A, b, LSMR, damp=damp).value)
    return jax.grad(loss, argnums=(0, 1))(A, b)


@jax.jit
def _grad_sin_traced(A, b, damp):
    loss = lambda A, b, d: _sin_sum(mfl.lstsq(A, b, LSMR, damp=d).value)
    return jax.grad(loss, argnums=(0, 1, 2))(A, b, damp)


def _dense_grad_sin(A, b, damp):
    loss = lambda A, b, d: _sin_sum(damped_oracle(A, b, d))
    return jax.grad(loss, argnums=(0, 1, 2))(A, b, damp)


@pytest.mark.parametrize(
    "batched, damp",
    [("vector", 0.0), ("operator", 0.5), ("both", 0.5), ("damp", None)],
)
def test_vmap_grad(batched, damp):
    """`vmap(grad)` equals a Python loop of `grad` and the dense oracle; batching the
    vector, the operator, both, or a traced λ (including λ = 0: the rule is then
    chosen at run time, and under `vmap` both rules run)."""
    rng = np.random.default_rng(800)
    A, b, _ = full_rank_problem((8, 4), seed=8)
    As = A + 0.3 * jnp.asarray(rng.standard_normal((3, 8, 4)))
    bs = b + jnp.asarray(rng.standard_normal((3, 8)))
    if batched == "damp":
        damps = jnp.asarray([0.0, 0.3, 1.0])
        got = jax.jit(jax.vmap(_grad_sin_traced, in_axes=(None, None, 0)))(A, b, damps)
        loop = None  # (the oracle suffices; a loop would compile another program)
        oracle = jax.vmap(_dense_grad_sin, in_axes=(None, None, 0))(A, b, damps)
    else:
        A_axis = 0 if batched in ("operator", "both") else None
        b_axis = 0 if batched in ("vector", "both") else None
        A_in = As if A_axis == 0 else A
        b_in = bs if b_axis == 0 else b
        grad = lambda A, b: _grad_sin(A, b, damp)
        got = jax.jit(jax.vmap(grad, in_axes=(A_axis, b_axis)))(A_in, b_in)
        pick = lambda xs, axis, i: xs[i] if axis == 0 else xs
        loop = [grad(pick(A_in, A_axis, i), pick(b_in, b_axis, i)) for i in range(3)]
        oracle = jax.vmap(
            lambda A, b: _dense_grad_sin(A, b, damp)[:2], in_axes=(A_axis, b_axis)
        )(A_in, b_in)
    if loop is not None:
        loop = jtu.tree_map(lambda *xs: jnp.stack(xs), *loop)
        assert_close(got, loop, rtol=1e-10)
    assert_close(got, oracle)


def test_jacfwd_jacrev():
    """Full Jacobians of x with respect to A and b (undamped, inconsistent): forward
    and reverse mode agree with each other and with the oracle."""
    A, b, _ = full_rank_problem((7, 4), seed=9)
    fn = lambda A, b: mfl.lstsq(A, b, LSMR).value
    fwd = jax.jit(jax.jacfwd(fn, argnums=(0, 1)))(A, b)
    rev = jax.jit(jax.jacrev(fn, argnums=(0, 1)))(A, b)
    want = jax.jacfwd(undamped_oracle, argnums=(0, 1))(A, b)
    assert_close(fwd, rev, rtol=1e-9)
    assert_close(fwd, want)
    assert_close(rev, want)


# ---------------------------------------------------------------------------------
# Operators: Jacobians of a model, pytrees
# ---------------------------------------------------------------------------------


def _mlp(params, X):
    return jnp.tanh(X @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]


def _mlp_problem():
    """A 3-4-1 tanh MLP on 12 inputs: its Jacobian is 12 × 21 (wide, cond ≈ 50)."""
    rng = np.random.default_rng(10)
    params = {
        "W1": rng.standard_normal((3, 4)),
        "b1": 0.1 * rng.standard_normal(4),
        "W2": rng.standard_normal(4) / 2,
        "b2": np.asarray(0.1),
    }
    params = jtu.tree_map(jnp.asarray, params)
    X = jnp.asarray(rng.standard_normal((12, 3)))
    y = jnp.asarray(rng.standard_normal(12))
    return params, X, y


@pytest.mark.parametrize("kind", ["jacobian", "function"])
def test_mlp_jacobian_operator(kind):
    """Gradient with respect to an MLP's parameters of a function of the
    (Gauss–Newton) step `J⁺ y` (undamped, JacobianLinearOperator) or
    `(JᵀJ + λ²I)⁻¹Jᵀy` (damped, FunctionLinearOperator closing over the
    parameters), against the materialised Jacobian."""
    params, X, y = _mlp_problem()
    flat, unravel = ravel_pytree(params)
    weights = jnp.asarray(np.random.default_rng(11).standard_normal(flat.size))
    damp = 0.0 if kind == "jacobian" else 0.1

    def loss_of_step(step_flat):
        return weights @ step_flat + jnp.sum(step_flat**2)

    def loss(params):
        if kind == "jacobian":
            op = lx.JacobianLinearOperator(lambda p, X: _mlp(p, X), params, X)
        else:
            struct = jtu.tree_map(
                lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params
            )
            jvp = lambda v: jax.jvp(lambda p: _mlp(p, X), (params,), (v,))[1]
            op = lx.FunctionLinearOperator(jvp, struct)
        step = mfl.lstsq(op, y, LSMR, damp=damp).value
        assert jtu.tree_structure(step) == jtu.tree_structure(params)
        return loss_of_step(ravel_pytree(step)[0])

    def dense_loss(params):
        J = jax.jacfwd(lambda f: _mlp(unravel(f), X))(ravel_pytree(params)[0])
        if damp == 0:
            step = J.T @ jnp.linalg.solve(J @ J.T, y)  # full row rank
        else:
            step = damped_oracle(J, y, damp)
        return loss_of_step(step)

    value, grad = jax.jit(jax.value_and_grad(loss))(params)
    want_value, want_grad = jax.value_and_grad(dense_loss)(params)
    assert rel_err(value, want_value) <= RTOL
    assert_close(grad, want_grad)


@pytest.mark.parametrize("kind, damped", [("pytree", False), ("pytree_function", True)])
def test_pytree_operator(kind, damped):
    """An operator from a dict to a tuple: value, JVP and VJP with respect to its
    matrix, b (a tuple), x0 (a dict) and λ are pytrees of the right structure and
    match the dense flattening."""
    wrap = {
        "pytree": pytree_matrix_operator,
        "pytree_function": pytree_function_operator,
    }
    wrap = wrap[kind]
    A, b, x0 = full_rank_problem((8, 6), seed=12)
    template = wrap(np.asarray(A))
    b_tree, x0_tree = template.vector(b), template.x(x0)
    assert isinstance(b_tree, tuple) and isinstance(x0_tree, dict)
    flat = lambda tree: ravel_pytree(tree)[0]

    def fn(A, b, x0, d=0.0):
        return mfl.lstsq(wrap(A).operator, b, LSMR, damp=d, x0=x0).value

    def oracle(A, b, x0, d=0.0):
        if damped:
            return template.x(damped_oracle(A, flat(b), d, flat(x0)))
        return template.x(undamped_oracle(A, flat(b), flat(x0)))

    primals = (A, b_tree, x0_tree) + ((jnp.asarray(0.4),) if damped else ())
    (value, _, (_, b_bar, x0_bar, *_)), _ = check_against_oracle(fn, oracle, primals)
    assert isinstance(value, dict)
    assert jtu.tree_structure(b_bar) == jtu.tree_structure(b_tree)
    assert jtu.tree_structure(x0_bar) == jtu.tree_structure(x0_tree)


# ---------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("damped", [False, True], ids=["undamped", "damped"])
def test_zero_rhs(damped):
    """b = 0: x = 0, and the value, JVP and VJP (w.r.t. A, b and λ) are finite and
    right."""
    A, _, _ = full_rank_problem((8, 5), seed=14)
    b = jnp.zeros(8)
    if damped:
        fn = lambda A, b, d: mfl.lstsq(A, b, LSMR, damp=d).value
        oracle = lambda A, b, d: damped_oracle(A, b, d)
        primals = (A, b, jnp.asarray(0.5))
    else:
        fn = lambda A, b: mfl.lstsq(A, b, LSMR).value
        oracle = lambda A, b: undamped_oracle(A, b)
        primals = (A, b)
    (value, tangent, cotangents), _ = check_against_oracle(fn, oracle, primals)
    assert float(jnp.max(jnp.abs(value))) == 0.0
    assert float(jnp.linalg.norm(tangent)) > 0.1  # from ḃ
    assert float(jnp.linalg.norm(cotangents[1])) > 0.1  # b̄


def _failing_problem(damp):
    """b = 0, so the forward solve succeeds at once, but every derivative solve
    needs more than one step: with `max_steps=1, atol=btol=0` they all fail."""
    A, _, _ = full_rank_problem((8, 5), seed=15)
    b = jnp.zeros(8)
    b_dot = jnp.asarray(np.random.default_rng(1500).standard_normal(8))
    solver = mfl.LSMR(atol=0.0, btol=0.0, max_steps=1)
    exact = jax.jvp(lambda b: damped_oracle(A, b, damp), (b,), (b_dot,))[1]
    return A, b, b_dot, solver, exact


@pytest.mark.parametrize(
    "mode, damp", [("jvp", 0.0), ("grad", 0.5)], ids=["jvp-undamped", "grad-damped"]
)
def test_failed_derivative_solve(mode, damp):
    """`throw=False`: a failing derivative solve never raises (and its result is
    indeed inaccurate); `throw=True`: it raises, naming the derivative solve."""
    A, b, b_dot, solver, exact_jvp = _failing_problem(damp)
    exact_grad = jax.grad(lambda b: damped_oracle(A, b, damp) @ exact_jvp)(b)

    def derivative(throw):
        solve = lambda b: mfl.lstsq(A, b, solver, damp=damp, throw=throw).value
        if mode == "jvp":
            return eqx.filter_jit(lambda b: jax.jvp(solve, (b,), (b_dot,))[1])
        return eqx.filter_jit(jax.grad(lambda b: solve(b) @ exact_jvp))

    sol = mfl.lstsq(A, b, solver, damp=damp, throw=False)
    assert sol.result == mfl.RESULTS.successful
    got = derivative(False)(b)
    assert bool(jnp.all(jnp.isfinite(got)))
    exact = exact_jvp if mode == "jvp" else exact_grad
    assert rel_err(got, exact) > 1e-3  # the derivative solve did fail
    with pytest.raises(eqx.EquinoxRuntimeError, match="derivative"):
        jax.block_until_ready(derivative(True)(b))


@pytest.mark.parametrize(
    "solver, shape",
    [("lsmr", (9, 6)), ("lsqr", (6, 9))],
    ids=["lsmr-tall", "lsqr-wide"],
)
def test_lineax_linear_solve_rank_deficient(solver, shape):
    """`lx.linear_solve(op, b, solver=LSMR/LSQR)` differentiates like A⁺b (lineax's
    own rules, using the solver's transpose) on A = B C of rank 3; gradients with
    respect to the matrix itself and b."""
    S = SOLVERS[solver]
    B, C, b, _ = factors(*shape, 3, seed=17)
    A = B @ C
    ct = jnp.asarray(np.random.default_rng(1700).standard_normal(shape[1]))
    fn = lambda A, b: lx.linear_solve(lx.MatrixLinearOperator(A), b, S).value @ ct
    oracle = lambda A, b: undamped_oracle(A, b, rank=3) @ ct
    got = jax.jit(jax.grad(fn, argnums=(0, 1)))(A, b)
    want = jax.grad(oracle, argnums=(0, 1))(A, b)
    assert_close(got, want)


@pytest.mark.parametrize("damped", [False, True], ids=["undamped", "damped"])
def test_float32(damped):
    """float32 inputs (x64 on): gradients run, are float32, and are accurate to
    float32-level tolerances (solver atol = btol = 1e-6)."""
    S = mfl.LSMR(atol=1e-6, btol=1e-6, max_steps=MAX_STEPS)
    A, b, _ = full_rank_problem((10, 4), seed=18)
    A32, b32 = A.astype(jnp.float32), b.astype(jnp.float32)
    damp = jnp.asarray(0.5 if damped else 0.0, jnp.float32)
    loss = lambda A, b, d: _sin_sum(mfl.lstsq(A, b, S, damp=d if damped else 0.0).value)
    argnums = (0, 1, 2) if damped else (0, 1)
    got = jax.jit(jax.grad(loss, argnums=argnums))(A32, b32, damp)
    assert all(g.dtype == jnp.float32 for g in got)
    want = jax.grad(lambda A, b, d: _sin_sum(damped_oracle(A, b, d)), argnums=argnums)(
        A, b, damp.astype(jnp.float64)
    )
    assert_close(jtu.tree_map(lambda g: g.astype(jnp.float64), got), want, rtol=1e-3)
