"""The number of Krylov solves per derivative is a published property
(docs/derivatives.md).

Counted structurally on jaxprs: a `while` equation is this package's forward solve,
a `linear_solve` equation is a lineax solve made by a derivative rule. A `cond`
contributes the counts of each of its branches, so a function has a *set* of possible
counts, one per execution path. Every path must make exactly one forward solve; the
extra solves are, for a JVP and equally for a VJP (which JAX derives by transposing
the JVP, one solve for one solve):

- with respect to b or x0 only: 1, for every λ ≥ 0;
- with respect to A: 3 (ρ = A⁺ᴴ(x − x0), shared by all tangents; the residual
  term's solve with Kᴴ; the outer solve with K = [A; λI]), for every λ ≥ 0 and every
  rank; with `full_rank=True`, 2 when tall or wide and 1 when square;
- with respect to a traced λ: 2 (ρ and the outer solve).

There is no run-time choice between rules any more: every path count is one
number. (A residual-term solve whose right-hand side is certified zero still
appears, and exits at step 0.)

Only `make_jaxpr` runs here: nothing is compiled.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

import matfree_lstsq as mfl


FORWARD = "while"
DERIVATIVE = "linear_solve"


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(v, jex_core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jex_core.Jaxpr):
                yield v


def _add(left, right):
    return {(a + c, b + d) for (a, b), (c, d) in itertools.product(left, right)}


def path_counts(jaxpr) -> set[tuple[int, int]]:
    """`{(forward solves, derivative solves)}` over the execution paths of `jaxpr`."""
    totals = {(0, 0)}
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == FORWARD:
            here = {(1, 0)}
        elif name == DERIVATIVE:
            here = {(0, 1)}
        elif name == "cond":
            here = set().union(*(path_counts(b.jaxpr) for b in eqn.params["branches"]))
        else:
            # Calls (`jit`, `custom_jvp_call`, ...) run their bodies once, in order.
            here = {(0, 0)}
            for sub in _subjaxprs(eqn):
                here = _add(here, path_counts(sub))
        totals = _add(totals, here)
    return totals


def extra_solves(fn, *args) -> set[int]:
    """The derivative-solve counts of `fn`'s paths, after checking that every path
    makes exactly one forward solve."""
    counts = path_counts(jax.make_jaxpr(fn)(*args).jaxpr)
    assert {forward for forward, _ in counts} == {1}, counts
    return {extra for _, extra in counts}


# ---------------------------------------------------------------------------------
# The counting itself
# ---------------------------------------------------------------------------------


def _path_counts_of(fn, *args):
    return path_counts(jax.make_jaxpr(fn)(*args).jaxpr)


def test_path_counts_sums_sequences_and_unions_branches():
    solve = lambda x: jax.lax.while_loop(lambda c: c < 1, lambda c: c + 1, x)
    one = lambda x: solve(x)
    two = lambda x: solve(solve(x))
    branch = lambda p, x: jax.lax.cond(p, one, two, x)
    assert _path_counts_of(two, 0) == {(2, 0)}
    assert _path_counts_of(jax.jit(two), 0) == {(2, 0)}
    assert _path_counts_of(branch, True, 0) == {(1, 0), (2, 0)}
    assert _path_counts_of(lambda p, x: two(branch(p, x)), True, 0) == {(3, 0), (4, 0)}


def test_forward_solve_alone():
    A, b = _problem((8, 5))
    for damp in (0.0, 0.5):
        f = lambda A, b, damp=damp: mfl.lstsq(A, b, _solver("lsmr"), damp=damp).value
        assert extra_solves(f, A, b) == {0}


# ---------------------------------------------------------------------------------
# Per-derivative solve counts
# ---------------------------------------------------------------------------------


SHAPES = {"tall": (8, 5), "wide": (5, 8), "square": (6, 6)}


def _solver(name, full_rank=False):
    cls = {"lsmr": mfl.LSMR, "lsqr": mfl.LSQR}[name]
    return cls(atol=1e-12, btol=1e-12, max_steps=50, full_rank=full_rank)


def _problem(shape, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape)), jnp.asarray(
        rng.standard_normal(shape[0])
    )


def _counts(mode, solver, shape, wrt, damp):
    """Extra solves of a JVP or VJP of `x = lstsq(A, b, damp=λ, x0=x0)` with respect
    to the inputs named in `wrt` only: the others are closed over, so their tangents
    are symbolic zeros. A number `damp` is static (the rule is picked at trace
    time); `damp="traced"` differentiates with respect to λ = 0.5 as well."""
    A, b = _problem(SHAPES[shape])
    x0 = jnp.linspace(-1.0, 1.0, A.shape[1])
    primals = {"A": A, "b": b, "x0": x0, "damp": jnp.asarray(0.5)}
    assert ("damp" in wrt) == (damp == "traced")

    def solve(*diff):
        kw = {**primals, "damp": damp, **dict(zip(wrt, diff))}
        return mfl.lstsq(kw["A"], kw["b"], solver, damp=kw["damp"], x0=kw["x0"]).value

    diff_primals = tuple(primals[k] for k in wrt)
    if mode == "jvp":
        tangents = tuple(jnp.ones_like(p) for p in diff_primals)
        fn = lambda *p: jax.jvp(solve, p, tangents)
    else:
        ct = jnp.linspace(1.0, 2.0, A.shape[1])
        fn = jax.grad(lambda *p: solve(*p) @ ct, argnums=tuple(range(len(wrt))))
    return extra_solves(fn, *diff_primals)


# (shape, full_rank, damp, wrt, expected extra solves)
CASES = [
    # One solve with respect to b or x0, whatever the damping.
    ("tall", False, 0.5, ("b",), {1}),
    ("wide", False, 0.5, ("b",), {1}),
    ("tall", False, 0.5, ("x0",), {1}),
    # With respect to A: ρ = A⁺ᴴ(x − x0) (shared by all tangents), the residual
    # term's solve with Kᴴ, and the outer solve with K.
    ("tall", False, 0.5, ("A",), {3}),
    ("wide", False, 0.5, ("A",), {3}),
    ("square", False, 0.5, ("A",), {3}),
    ("tall", False, 0.5, ("A", "b", "x0"), {3}),
    # Full row rank declared: no residual term.
    ("wide", True, 0.5, ("A",), {2}),
    # Full column rank declared: no ρ (the residual term carries Ȧᴴr).
    ("tall", True, 0.5, ("A",), {2}),
    # λ traced: the same rule as a concrete λ > 0; λ̇ needs ρ.
    ("tall", False, "traced", ("b", "x0", "damp"), {2}),
    ("tall", False, "traced", ("A", "b", "x0", "damp"), {3}),
    ("tall", True, "traced", ("damp",), {2}),
    # Undamped, no rank assumption.
    ("tall", False, 0.0, ("b",), {1}),
    ("wide", False, 0.0, ("b",), {1}),
    ("tall", False, 0.0, ("A",), {3}),
    ("wide", False, 0.0, ("A",), {3}),
    ("square", False, 0.0, ("A",), {3}),
    ("wide", False, 0.0, ("A", "b"), {3}),
    ("wide", False, 0.0, ("x0",), {1}),
    # Undamped, full_rank=True.
    ("tall", True, 0.0, ("A",), {2}),  # residual term and outer solve
    ("wide", True, 0.0, ("A",), {2}),  # ρ and outer solve
    ("square", True, 0.0, ("A",), {1}),
    ("tall", True, 0.0, ("b",), {1}),
    ("wide", True, 0.0, ("b",), {1}),
    ("tall", True, 0.0, ("x0",), {0}),  # full column rank: x0 has no effect
]


def _case_id(case):
    shape, full_rank, damp, wrt, _ = case
    damp = {0.0: "undamped", 0.5: "damped"}.get(damp, "damp_traced")
    rank = "-full_rank" if full_rank else ""
    return f"{damp}-{shape}{rank}-wrt_{'_'.join(wrt)}"


@pytest.mark.parametrize("mode", ["jvp", "vjp"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_solve_counts(case, mode):
    shape, full_rank, damp, wrt, expected = case
    solver = _solver("lsmr", full_rank)
    assert _counts(mode, solver, shape, wrt, damp) == expected


@pytest.mark.parametrize("mode", ["jvp", "vjp"])
@pytest.mark.parametrize(
    "case",
    [
        ("tall", False, 0.5, ("A",), {3}),
        ("wide", False, 0.0, ("A",), {3}),
        ("tall", True, 0.0, ("A",), {2}),
        ("square", False, 0.0, ("b",), {1}),
    ],
    ids=_case_id,
)
def test_solve_counts_lsqr(case, mode):
    shape, full_rank, damp, wrt, expected = case
    solver = _solver("lsqr", full_rank)
    assert _counts(mode, solver, shape, wrt, damp) == expected
