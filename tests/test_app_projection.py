"""`mfa.kernel_projector` against dense oracles.

Oracles: the orthogonal projector onto ker J from NumPy's SVD of the dense Jacobian
(`jax.jacfwd` of the flattened model), with the rank cut at max(m, n)·ε·σ_max, and
for alternating projections the same sweeps carried out with dense per-batch
projectors.
"""

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from app_models import init_mlp, mlp, mlp_problem, mlp_scalar, normal
from jax.flatten_util import ravel_pytree

import matfree_lstsq as mfl
from matfree_lstsq import applications as mfa


def svd_projector(jac: np.ndarray) -> np.ndarray:
    """Dense orthogonal projector onto ker(jac)."""
    _, s, vt = np.linalg.svd(jac, full_matrices=False)
    rank = int(np.sum(s > max(jac.shape) * np.finfo(jac.dtype).eps * s[0]))
    return np.eye(jac.shape[1]) - vt[:rank].T @ vt[:rank]


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0])


def random_like(params, seed, num=None):
    shape = () if num is None else (num,)
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(
        treedef, [normal(seed + i, shape + p.shape) for i, p in enumerate(leaves)]
    )


def row(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------
# An MLP 128 → 12 → 2 (1574 parameters) on 200 inputs: J is 400 × 1574, full row
# rank, condition number about 16.
# ---------------------------------------------------------------------------------

BATCH_SIZE = 50


@pytest.fixture(scope="module")
def problem():
    return mlp_problem((128, 12, 2), num_data=200, seed=5)


@pytest.fixture(scope="module")
def jacobian(problem):
    return problem.dense_jacobian()


@pytest.fixture(scope="module")
def oracle(jacobian):
    return svd_projector(jacobian)


def test_lstsq_matches_svd_projector(problem, oracle):
    assert 1000 <= problem.num_params <= 3000
    v = random_like(problem.params, seed=10, num=3)
    projector = mfa.kernel_projector(problem.model_fn, problem.params, problem.inputs)
    assert isinstance(projector, mfa.KernelProjector)
    pv, info = projector.project(v)
    assert jax.tree.structure(pv) == jax.tree.structure(v)
    for i in range(3):
        expected = oracle @ flat(row(v, i))
        assert rel(flat(row(pv, i)), expected) <= 1e-6
    # The solver certifies J P v ≈ 0 relative to ‖J‖‖P v‖ (its least-squares test).
    assert np.all(np.isin(np.asarray(info["istop"]), [1, 2, 4, 5]))
    assert np.all(np.asarray(info["residual"]) <= 1e-10)
    # `P(v)` is `project(v)[0]`.
    np.testing.assert_array_equal(flat(projector(v)), flat(pv))


def test_lstsq_streamed_matches_svd_projector(problem, oracle):
    v = random_like(problem.params, seed=20)
    projector = mfa.kernel_projector(
        problem.model_fn, problem.params, problem.inputs, batch_size=64
    )  # 4 batches, the last one padded
    assert rel(flat(projector(v)), oracle @ flat(v)) <= 1e-6


def test_dense_is_exact(problem, jacobian, oracle):
    v = random_like(problem.params, seed=30, num=2)
    projector = mfa.kernel_projector(
        problem.model_fn, problem.params, problem.inputs, method="dense", batch_size=64
    )
    pv, info = projector.project(v)
    assert np.all(np.asarray(info["rank"]) == 400)  # full row rank
    again = projector(pv)
    norm_j = np.linalg.norm(jacobian)
    for i in range(2):
        got = flat(row(pv, i))
        assert rel(got, oracle @ flat(row(v, i))) <= 1e-12
        # In the kernel to machine precision, and idempotent.
        assert np.linalg.norm(jacobian @ got) <= 1e-13 * norm_j * np.linalg.norm(got)
        assert rel(flat(row(again, i)), got) <= 1e-13


# ---------------------------------------------------------------------------------
# Alternating projections over 4 batches of 50 data.
# ---------------------------------------------------------------------------------

NUM_SWEEPS = 8


@pytest.fixture(scope="module")
def sweep(jacobian):
    """One sweep T = P_4 P_3 P_2 P_1 of dense per-batch projectors, in coordinates.

    Each batch's row space lies in range(Jᵀ), so T maps range(Jᵀ) into itself and
    fixes ker J: with V an orthonormal basis of range(Jᵀ) (the D × r right singular
    vectors), x = P v + V c and T x = P v + V (B c) with the r × r matrix
    B = Vᵀ T V = Π_b (I − (Vᵀ V_b)(Vᵀ V_b)ᵀ). The error of an iterate is ‖c‖.
    """
    _, s, vt = np.linalg.svd(jacobian, full_matrices=False)
    assert s[-1] > 1e-8 * s[0]  # full row rank: V is all of vt
    basis = vt.T
    rows = 2 * BATCH_SIZE
    sweep = np.eye(basis.shape[1])
    for start in range(0, jacobian.shape[0], rows):
        _, sb, vbt = np.linalg.svd(jacobian[start : start + rows], full_matrices=False)
        coords = basis.T @ vbt.T  # Vᵀ V_b
        sweep = (np.eye(basis.shape[1]) - coords @ coords.T) @ sweep
    return basis, sweep


def _dense_iterates(sweep, c, acceleration, num):
    """Coordinates (in range(Jᵀ)) of the first `num` iterates from coordinates `c`.

    Gearhart–Koshy: with d = (B − I) c, ⟨x, d⟩ = ⟨c, d⟩ because P v ⊥ range(Jᵀ)."""
    out = []
    for _ in range(num):
        d = sweep @ c - c
        c = c - (c @ d) / (d @ d) * d if acceleration else c + d
        out.append(c)
    return out


@pytest.mark.parametrize("acceleration", [False, True])
def test_alternating_converges(problem, oracle, sweep, acceleration):
    basis, b = sweep
    v = random_like(problem.params, seed=40)
    v_flat = flat(v)
    target = oracle @ v_flat
    one_sweep = mfa.kernel_projector(
        problem.model_fn,
        problem.params,
        problem.inputs,
        method="alternating",
        batch_size=BATCH_SIZE,
        num_sweeps=1,
        tol=0.0,
        acceleration=acceleration,
    )
    # One sweep (with its line search) depends on the current iterate only, so
    # applying the one-sweep projector k times gives the k-th iterate.
    x = v
    errors = [np.linalg.norm(v_flat - target)]
    dense = _dense_iterates(b, basis.T @ v_flat, acceleration, NUM_SWEEPS)
    for k in range(NUM_SWEEPS):
        x, info = one_sweep.project(x)
        assert int(info["num_sweeps"]) == 1
        # The matrix-free sweep is the dense sweep, to the solvers' accuracy.
        assert rel(flat(x), target + basis @ dense[k]) <= 1e-8
        errors.append(np.linalg.norm(flat(x) - target))
    errors = np.array(errors)
    # Monotone decrease of the error ‖x_k − P v‖ ...
    assert np.all(np.diff(errors) < 0), errors
    # ... within the worst-case bound: plain sweeps satisfy
    # ‖x_N − Pv‖ ≤ ‖T^N − P‖ ‖v − Pv‖ (T commutes with P); a Gearhart–Koshy step is
    # never worse than a plain sweep from the same point, so ≤ ‖T − P‖^N ‖v − Pv‖.
    if acceleration:
        rate = np.linalg.norm(b, 2) ** NUM_SWEEPS
    else:
        rate = np.linalg.norm(np.linalg.matrix_power(b, NUM_SWEEPS), 2)
    assert errors[-1] <= rate * errors[0]
    # The curve relative to ‖P v‖ (shown with `pytest -s`; recorded in the docs).
    curve = " ".join(f"{e:.2e}" for e in errors / np.linalg.norm(target))
    print(f"\nacceleration={acceleration}: bound {rate:.3f}; {curve}")


def test_alternating_stopping_rule(problem, oracle):
    v = random_like(problem.params, seed=50)
    tol = 1e-2
    projector = mfa.kernel_projector(
        problem.model_fn,
        problem.params,
        problem.inputs,
        method="alternating",
        batch_size=BATCH_SIZE,
        num_sweeps=30,
        tol=tol,
    )
    x, info = projector.project(v)
    k = int(info["num_sweeps"])
    change = np.asarray(info["change"])
    assert 1 < k < 30
    assert np.all(change[: k - 1] > tol) and change[k - 1] <= tol
    assert np.all(np.isnan(change[k:]))
    assert int(info["num_steps"]) > 0
    # Stopping early still gives a point much closer to P v than v.
    target = oracle @ flat(v)
    assert rel(flat(x), target) <= 0.1 * rel(flat(v), target)


# ---------------------------------------------------------------------------------
# The loss kernel: per-datum losses change as O(t²) along projected directions.
# ---------------------------------------------------------------------------------


def test_loss_kernel_is_second_order():
    problem = mlp_problem((6, 16, 2), num_data=40, seed=7)

    def loss_fn(outputs, targets):
        return jnp.sum((outputs - targets) ** 2, axis=-1)

    projector = mfa.kernel_projector(
        problem.model_fn,
        problem.params,
        problem.inputs,
        kind="loss",
        loss_fn=loss_fn,
        targets=problem.targets,
    )
    direction = random_like(problem.params, seed=60)
    projected = projector(direction)

    @jax.jit
    def change(d, t):
        def losses(p):
            return loss_fn(problem.model_fn(p, problem.inputs), problem.targets)

        moved = jax.tree.map(lambda p, a: p + t * a, problem.params, d)
        return jnp.max(jnp.abs(losses(moved) - losses(problem.params)))

    def unit(d):
        norm = jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(d)))
        return jax.tree.map(lambda a: a / norm, d)

    t1, t2 = 1e-2, 1e-3
    ratio_projected = change(unit(projected), t1) / change(unit(projected), t2)
    ratio_random = change(unit(direction), t1) / change(unit(direction), t2)
    # O(t²): a 10× smaller step changes the losses 100× less; O(t): 10× less.
    assert 80 <= ratio_projected <= 120, ratio_projected
    assert 8 <= ratio_random <= 12, ratio_random


# ---------------------------------------------------------------------------------
# Scale: 10 vectors, an MLP with ~1 million parameters, 2 000 inputs.
# ---------------------------------------------------------------------------------


def _largest_intermediate(jaxpr) -> int:
    """Size of the largest array anywhere in a (closed) jaxpr, sub-jaxprs included."""
    largest = 0

    def visit(jaxpr):
        nonlocal largest
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                aval = var.aval
                if hasattr(aval, "shape"):
                    largest = max(largest, int(np.prod(aval.shape)))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return largest


def test_scale_does_not_materialise_jacobian():
    sizes = [64, 1000, 936, 1]
    num_data, num_vectors = 2000, 10
    params = init_mlp(0, sizes)
    inputs = normal(1, (num_data, 64))
    num_params = sum(p.size for p in jax.tree.leaves(params))
    assert 1_000_000 <= num_params <= 1_010_000
    full_jacobian = num_data * 1 * num_params  # N·O·P entries
    # One solver step: the program (and its memory) is the one of a full solve,
    # only the loop bound differs.
    projector = mfa.kernel_projector(
        mlp_scalar, params, inputs, solver=mfl.LSMR(max_steps=1)
    )
    v = jax.tree.map(lambda p: jnp.ones((num_vectors, *p.shape), p.dtype), params)
    dynamic, static = eqx.partition((projector, v), eqx.is_array)

    def project(dynamic):
        projector, v = eqx.combine(dynamic, static)
        return projector.project(v)

    jaxpr = jax.make_jaxpr(project)(dynamic)
    assert _largest_intermediate(jaxpr) <= full_jacobian // 50
    compiled = jax.jit(project).lower(dynamic).compile()
    memory = compiled.memory_analysis()
    peak = (
        memory.temp_size_in_bytes
        + memory.argument_size_in_bytes
        + memory.output_size_in_bytes
    )
    # Far below one float64 copy of J (16 GB): about 5 %, mostly LSMR's Krylov
    # vectors (a few parameter-sized arrays per projected vector).
    assert peak <= 0.1 * 8 * full_jacobian
    pv, info = compiled(dynamic)
    assert np.all(np.asarray(info["num_steps"]) == 1)
    # One LSMR step already shrinks the residual v − Jᵀλ (the projection's estimate).
    norms = jax.vmap(lambda x: jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(x))))
    assert np.all(np.asarray(norms(pv)) < np.asarray(norms(v)))


# ---------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------


def test_bad_input():
    problem = mlp_problem((3, 4, 2), num_data=10, seed=8)
    args = (problem.model_fn, problem.params, problem.inputs)
    projector = mfa.kernel_projector(*args, method="dense")
    with pytest.raises(ValueError, match="method"):
        mfa.kernel_projector(*args, method="eigh")
    with pytest.raises(ValueError, match="kind"):
        mfa.kernel_projector(*args, kind="ggn")
    with pytest.raises(ValueError, match="loss_fn"):
        mfa.kernel_projector(*args, kind="loss")
    with pytest.raises(ValueError, match="batch_size"):
        mfa.kernel_projector(*args, method="alternating")
    with pytest.raises(ValueError, match="num_sweeps"):
        mfa.kernel_projector(*args, method="alternating", batch_size=5, num_sweeps=0)
    with pytest.raises(ValueError, match="per-datum losses"):
        mfa.kernel_projector(
            *args,
            kind="loss",
            loss_fn=lambda f, y: jnp.sum((f - y) ** 2),  # a scalar, not per datum
            targets=problem.targets,
        )
    with pytest.raises(ValueError, match="targets"):
        mfa.kernel_projector(
            *args,
            kind="loss",
            loss_fn=lambda f, y: jnp.sum((f - y) ** 2, axis=-1),
            targets=problem.targets[:5],
        )
    with pytest.raises(ValueError, match="params"):
        mfa.kernel_projector(
            mlp, dict(problem.params, W1=jnp.zeros((5, 2))), problem.inputs
        )
    with pytest.raises(ValueError, match="`v`"):
        projector({"W0": jnp.zeros((3, 4))})  # missing leaves
    with pytest.raises(ValueError, match="`v`"):
        bad = jax.tree.map(lambda p: jnp.zeros((2, *p.shape)), problem.params)
        bad["W0"] = jnp.zeros((3, *problem.params["W0"].shape))  # batch sizes differ
        projector(bad)
    with pytest.raises(ValueError, match="`v`"):
        projector(jax.tree.map(lambda p: p.astype(jnp.float32), problem.params))
    with pytest.raises(ValueError, match="solver"):
        mfa.kernel_projector(*args, solver="lsmr")
