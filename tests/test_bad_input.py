"""Bad and degenerate input: structure and dtype mismatches, invalid hyperparameters,
NaN/inf, trivial right-hand sides, step limits and very large (abstract) shapes."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import matfree_lstsq as mfl


# One instance per solver, shared by the tests, so that XLA compilations are reused
# (the solver's hyperparameters are static under `jit`).
SOLVERS = [mfl.LSMR(), mfl.LSQR()]
IDS = ["LSMR", "LSQR"]
RESULTS = mfl.RESULTS


def _problem(m=8, n=5, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((m, n))), jnp.asarray(rng.standard_normal(m))


def _matmul(A, x):
    return A @ x


def _function_operator(A):
    # `eqx.Partial` keeps `A` a dynamic leaf, so operators built from different
    # matrices share one compilation.
    return lx.FunctionLinearOperator(
        eqx.Partial(_matmul, A),
        jax.ShapeDtypeStruct((A.shape[1],), A.dtype),
        closure_convert=False,
    )


def _with_max_steps(solver, max_steps):
    return type(solver)(max_steps=max_steps)


def _is(result, item) -> bool:
    return bool(result == item)


def _assert_all_finite(sol):
    assert np.all(np.isfinite(np.asarray(sol.value)))
    for key, value in sol.stats.items():
        assert np.isfinite(np.asarray(value)), key


# ---------------------------------------------------------------------------------
# Structure and dtype of the inputs
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vector", "got", "expected"),
    [
        (jnp.zeros(7), "float64[7]", "float64[8]"),
        (jnp.zeros(9), "float64[9]", "float64[8]"),
        (jnp.zeros((8, 1)), "float64[8, 1]", "float64[8]"),
        (jnp.zeros(8, jnp.float32), "float32[8]", "float64[8]"),
        (jnp.zeros(8, jnp.complex128), "complex128[8]", "float64[8]"),
        (jnp.zeros(8, jnp.int32), "int32[8]", "float64[8]"),
    ],
)
def test_vector_shape_or_dtype_mismatch(vector, got, expected):
    A, _ = _problem()
    with pytest.raises(ValueError) as info:
        mfl.lstsq(A, vector)
    message = str(info.value)
    assert got in message
    assert expected in message


def test_vector_tree_structure_mismatch_names_both():
    A, b = _problem()
    with pytest.raises(ValueError) as info:
        mfl.lstsq(A, (b[:4], b[4:]))
    message = str(info.value)
    assert "float64[4]" in message  # what was passed (a tuple of two halves)
    assert "float64[8]" in message  # what the operator expects


def test_pytree_operator_vector_mismatch_names_both():
    in_struct = {"p": jax.ShapeDtypeStruct((3,), jnp.float64)}
    op = lx.FunctionLinearOperator(
        lambda x: {"out": jnp.concatenate([x["p"], x["p"]])}, in_struct
    )
    with pytest.raises(ValueError) as info:
        mfl.lstsq(op, {"wrong_key": jnp.zeros(6)})
    message = str(info.value)
    assert "wrong_key" in message
    assert "out" in message


def test_x0_mismatch_names_both():
    A, b = _problem()
    with pytest.raises(ValueError) as info:
        mfl.lstsq(A, b, x0=jnp.zeros(4))
    assert "float64[4]" in str(info.value)
    assert "float64[5]" in str(info.value)
    with pytest.raises(ValueError) as info:
        mfl.lstsq(A, b, x0=jnp.zeros(5, jnp.float32))
    assert "float32[5]" in str(info.value)
    assert "float64[5]" in str(info.value)


def test_bidiagonalise_vector_mismatch():
    A, _ = _problem()
    with pytest.raises(ValueError) as info:
        mfl.bidiagonalise(A, jnp.zeros(5), 2)
    assert "float64[5]" in str(info.value)
    assert "float64[8]" in str(info.value)


@pytest.mark.parametrize(
    "array",
    [
        jnp.zeros(8),
        jnp.zeros((2, 4, 2)),
        jnp.zeros(()),
        np.zeros((8, 5, 1)),
    ],
    ids=["1d", "3d", "0d", "numpy-3d"],
)
def test_array_operator_must_be_2d(array):
    b = jnp.zeros(8)
    with pytest.raises(ValueError, match="2-D"):
        mfl.lstsq(array, b)
    with pytest.raises(ValueError, match="2-D"):
        mfl.bidiagonalise(array, b, 1)


def test_numpy_2d_operator_is_accepted():
    A, b = _problem()
    sol = mfl.lstsq(np.asarray(A), b)
    np.testing.assert_allclose(
        sol.value, np.linalg.lstsq(np.asarray(A), np.asarray(b))[0], rtol=1e-6
    )


def test_solver_and_preconditioner_types():
    A, b = _problem()
    with pytest.raises(TypeError):
        mfl.lstsq(A, b, lx.LU())
    with pytest.raises(TypeError):
        mfl.lstsq(A, b, preconditioner=jnp.eye(5))
    # A preconditioner on the wrong space.
    with pytest.raises(ValueError, match="preconditioner"):
        mfl.lstsq(A, b, preconditioner=lx.DiagonalLinearOperator(jnp.ones(8)))


# ---------------------------------------------------------------------------------
# Hyperparameters
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", [mfl.LSMR, mfl.LSQR])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(atol=-1e-6),
        dict(btol=-1e-6),
        dict(atol=float("nan")),
        dict(conlim=0.0),
        dict(conlim=-1.0),
        dict(max_steps=-1),
        dict(max_steps=2.5),
        dict(max_steps=True),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_invalid_hyperparameters_raise_at_construction(solver, kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=name):
        solver(**kwargs)


@pytest.mark.parametrize("solver", [mfl.LSMR, mfl.LSQR])
def test_valid_boundary_hyperparameters(solver):
    # Zero tolerances and zero steps are legal.
    s = solver(atol=0.0, btol=0.0, max_steps=0)
    assert s.max_steps == 0
    assert solver(max_steps=np.int64(3)).max_steps == 3


@pytest.mark.parametrize(
    "damp",
    [
        -1.0,
        -1e-300,
        jnp.asarray(-0.5),
        jnp.ones(2),
        1.0 + 1.0j,
    ],
    ids=["neg", "tiny-neg", "neg-array", "vector", "complex"],
)
def test_invalid_damp_raises(damp):
    A, b = _problem()
    with pytest.raises(ValueError, match="damp"):
        mfl.lstsq(A, b, damp=damp)


# ---------------------------------------------------------------------------------
# Non-finite input
# ---------------------------------------------------------------------------------


def _nonfinite_case(where: str, bad: float):
    A, b = _problem()
    kwargs = {}
    op = lx.MatrixLinearOperator(A)
    if where == "vector":
        b = b.at[3].set(bad)
    elif where == "matrix":
        op = lx.MatrixLinearOperator(A.at[2, 1].set(bad))
    elif where == "function":
        op = _function_operator(A.at[6, 4].set(bad))
    elif where == "x0":
        kwargs["x0"] = jnp.zeros(5).at[0].set(bad)
    elif where == "damp":
        kwargs["damp"] = bad
    else:  # pragma: no cover
        raise ValueError(where)
    return op, b, kwargs


def _cases(*wheres):
    return [(w, bad) for w in wheres for bad in (float("nan"), float("inf"))]


# NaN `damp` shares a compilation with the plain call; a non-zero `damp` or an `x0`
# compile anew, so those extra cases run once.
NONFINITE_THROW_FALSE = [
    pytest.param(solver, where, bad, id=f"{name}-{where}-{bad}")
    for solver, name in zip(SOLVERS, IDS)
    for where, bad in _cases("vector", "matrix", "function") + [("damp", np.nan)]
] + [
    pytest.param(SOLVERS[0], "x0", np.nan, id="LSMR-x0-nan"),
    pytest.param(SOLVERS[1], "damp", np.inf, id="LSQR-damp-inf"),
]


@pytest.mark.parametrize(("solver", "where", "bad"), NONFINITE_THROW_FALSE)
def test_nonfinite_input_returned_with_throw_false(solver, where, bad):
    op, b, kwargs = _nonfinite_case(where, bad)
    sol = mfl.lstsq(op, b, solver, throw=False, **kwargs)
    assert _is(sol.result, RESULTS.nonfinite_input)
    assert int(sol.stats["istop"]) == -1
    # Detected up front, not after running into the step limit.
    assert int(sol.stats["num_steps"]) <= 1


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
@pytest.mark.parametrize(("where", "bad"), _cases("vector", "matrix", "function"))
def test_nonfinite_input_raises_with_throw_true(solver, where, bad):
    op, b, kwargs = _nonfinite_case(where, bad)
    with pytest.raises(Exception, match=r"(?i)non-finite|nan"):
        sol = mfl.lstsq(op, b, solver, **kwargs)
        jax.block_until_ready(sol.value)


# ---------------------------------------------------------------------------------
# Trivial problems
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solver", "damp"),
    [(SOLVERS[0], 0.0), (SOLVERS[1], 0.0), (SOLVERS[0], 0.5)],
    ids=["LSMR", "LSQR", "LSMR-damped"],
)
def test_zero_rhs(solver, damp):
    A, _ = _problem()
    sol = mfl.lstsq(A, jnp.zeros(8), solver, damp=damp)
    np.testing.assert_array_equal(sol.value, np.zeros(5))
    assert int(sol.stats["istop"]) == 0
    assert int(sol.stats["num_steps"]) == 0
    assert _is(sol.result, RESULTS.successful)
    _assert_all_finite(sol)
    assert float(sol.stats["norm_r"]) == 0.0
    assert float(sol.stats["norm_x"]) == 0.0


def test_zero_rhs_pytree():
    solver = SOLVERS[0]
    in_struct = {"a": jax.ShapeDtypeStruct((2,), jnp.float64)}
    op = lx.FunctionLinearOperator(lambda x: (x["a"], 2.0 * x["a"]), in_struct)
    sol = mfl.lstsq(op, (jnp.zeros(2), jnp.zeros(2)), solver)
    np.testing.assert_array_equal(sol.value["a"], np.zeros(2))
    assert int(sol.stats["istop"]) == 0
    assert _is(sol.result, RESULTS.successful)
    for value in sol.stats.values():
        assert np.isfinite(np.asarray(value))


@pytest.mark.parametrize(
    ("solver", "kind", "damp"),
    [
        (SOLVERS[0], "matrix", 0.0),
        (SOLVERS[1], "matrix", 0.0),
        (SOLVERS[0], "function", 0.3),
    ],
    ids=["LSMR-matrix", "LSQR-matrix", "LSMR-function-damped"],
)
def test_rhs_equal_to_A_x0_returns_x0(solver, kind, damp):
    A, _ = _problem()
    x0 = jnp.asarray(np.arange(1.0, 6.0))
    op = lx.MatrixLinearOperator(A) if kind == "matrix" else _function_operator(A)
    b = op.mv(x0)
    sol = mfl.lstsq(op, b, solver, x0=x0, damp=damp, throw=False)
    np.testing.assert_allclose(sol.value, x0, rtol=1e-14, atol=0)
    assert int(sol.stats["istop"]) == 0
    assert int(sol.stats["num_steps"]) == 0
    assert _is(sol.result, RESULTS.successful)
    _assert_all_finite(sol)


# ---------------------------------------------------------------------------------
# Step limits
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solver", "with_x0"),
    [(SOLVERS[0], False), (SOLVERS[1], False), (SOLVERS[1], True)],
    ids=["LSMR", "LSQR", "LSQR-x0"],
)
def test_max_steps_zero(solver, with_x0):
    A, b = _problem()
    x0 = jnp.full(5, 0.25) if with_x0 else None
    sol = mfl.lstsq(A, b, _with_max_steps(solver, 0), x0=x0, throw=False)
    assert int(sol.stats["istop"]) == 7
    assert int(sol.stats["num_steps"]) == 0
    assert _is(sol.result, RESULTS.max_steps_reached)
    expected = np.zeros(5) if x0 is None else np.asarray(x0)
    np.testing.assert_array_equal(sol.value, expected)
    _assert_all_finite(sol)


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_max_steps_zero_with_zero_rhs_is_success(solver):
    A, _ = _problem()
    s = _with_max_steps(solver, 0)
    sol = mfl.lstsq(A, jnp.zeros(8), s, throw=False)
    assert int(sol.stats["istop"]) == 0
    assert _is(sol.result, RESULTS.successful)
    np.testing.assert_array_equal(sol.value, np.zeros(5))
    _assert_all_finite(sol)


@pytest.mark.parametrize(
    ("solver", "max_steps"),
    [(SOLVERS[0], 2), (SOLVERS[1], 0)],
    ids=["LSMR-2", "LSQR-0"],
)
def test_max_steps_failure_raises_mentioning_max_steps(solver, max_steps):
    A, b = _problem()
    s = _with_max_steps(solver, max_steps)
    # The same solve with throw=False really does hit the limit ...
    sol = mfl.lstsq(A, b, s, throw=False)
    assert int(sol.stats["istop"]) == 7
    assert int(sol.stats["num_steps"]) == max_steps
    assert _is(sol.result, RESULTS.max_steps_reached)
    # ... and with throw=True it raises, saying so.
    with pytest.raises(eqx.EquinoxRuntimeError, match="max_steps"):
        sol = mfl.lstsq(A, b, s)
        jax.block_until_ready(sol.value)


# ---------------------------------------------------------------------------------
# Huge shapes, abstractly: the step counter must not overflow int32
# ---------------------------------------------------------------------------------

_HUGE = jax.ShapeDtypeStruct((2**32,), jnp.float32)


def _huge_operator():
    return lx.FunctionLinearOperator(lambda x: 2 * x, _HUGE)


@pytest.mark.parametrize(
    ("solver", "throw"),
    [
        (mfl.LSMR(), True),
        (mfl.LSQR(), True),  # default max_steps 2n = 2**33
        (mfl.LSMR(max_steps=2**40), False),
        (mfl.LSQR(max_steps=2**33), False),
    ],
    ids=["LSMR", "LSQR-default-2n", "LSMR-2^40", "LSQR-2^33"],
)
def test_huge_shapes_do_not_overflow_step_counter(solver, throw):
    op = _huge_operator()
    damp = jax.ShapeDtypeStruct((), jnp.float32)
    out = jax.eval_shape(
        lambda b, d: mfl.lstsq(op, b, solver, damp=d, throw=throw), _HUGE, damp
    )
    assert out.value.shape == (2**32,)
    assert out.value.dtype == jnp.float32
    assert out.stats["num_steps"].shape == ()
    assert out.stats["num_steps"].dtype == jnp.int32


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_huge_shapes_default_damp(solver):
    # Also a regression test: a concrete (Python float) `damp` used to be checked
    # with `bool(jnp...)`, which fails when the call is traced.
    op = _huge_operator()
    out = jax.eval_shape(lambda b: mfl.lstsq(op, b, solver), _HUGE)
    assert out.value.shape == (2**32,)
    assert out.stats["num_steps"].dtype == jnp.int32


def test_huge_shapes_bidiagonalise():
    op = _huge_operator()
    out = jax.eval_shape(lambda b: mfl.bidiagonalise(op, b, 3), _HUGE)
    assert out.left.shape == (4, 2**32)
    assert out.alpha.shape == (4,)
