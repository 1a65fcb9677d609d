"""Cost of differentiating a least-squares solve: this package vs lineax and matfree.

For each problem and library, in one process: the time of the value `x(θ, b)`, the
time of value + gradient of `⟨c, x⟩` with respect to the operator's parameters and
`b`, their ratio, and the number of Krylov solves in the differentiated program
(counted in its jaxpr; a `cond` between branches gives a range).

    python benchmarks/gradients.py            # full size (a few minutes)
    python benchmarks/gradients.py --small    # smoke test
"""

import argparse
import platform
import sys
from pathlib import Path

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
import matfree.lstsq  # noqa: E402
import numpy as np  # noqa: E402

import matfree_lstsq as mfl  # noqa: E402


sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    dense_problem,
    krylov_solves,
    mlp_apply,
    mlp_problem,
    timeit,
)


TOL = 1e-8


# --- each library's solve, as a function of (operator parameters, b) ------------


def _ours(make_operator, damp, maxiter):
    """This package, rank-agnostic and with `full_rank=True`."""

    def solver(full_rank):
        solver = mfl.LSMR(atol=TOL, btol=TOL, max_steps=maxiter, full_rank=full_rank)

        def solve(theta, b):
            return mfl.lstsq(make_operator(theta), b, solver, damp=damp).value

        return solve

    return {"matfree_lstsq": solver(False), "matfree_lstsq (full_rank)": solver(True)}


def dense_solvers(damp, n, maxiter):
    struct = jax.ShapeDtypeStruct((n,), jnp.float64)

    def lineax_solve(a, b):
        solver = lx.LSMR(rtol=TOL, atol=0.0, max_steps=maxiter)
        if damp == 0:
            return lx.linear_solve(lx.MatrixLinearOperator(a), b, solver).value
        # lineax has no damping: solve with the stacked operator [A; λI].
        stacked = lx.FunctionLinearOperator(lambda x: (a @ x, damp * x), struct)
        return lx.linear_solve(stacked, (b, jnp.zeros(n)), solver).value

    matfree_lsmr = matfree.lstsq.lsmr(atol=TOL, btol=TOL, maxiter=maxiter)

    def matfree_solve(a, b):
        x, _ = matfree_lsmr(lambda u, a: u @ a, b, a, damp=damp)
        return x

    return {
        **_ours(lx.MatrixLinearOperator, damp, maxiter),
        "lineax LSMR": lineax_solve,
        "matfree lsmr": matfree_solve,
    }


def mlp_solvers(inputs, maxiter):
    def fn(params, _):
        return mlp_apply(params, inputs)

    def jacobian(params):
        return lx.JacobianLinearOperator(fn, params)

    def lineax_solve(params, b):
        solver = lx.LSMR(rtol=TOL, atol=0.0, max_steps=maxiter)
        return lx.linear_solve(jacobian(params), b, solver).value

    matfree_lsmr = matfree.lstsq.lsmr(atol=TOL, btol=TOL, maxiter=maxiter)

    def matfree_solve(params, b):
        def vecmat(u, params):
            _, vjp = jax.vjp(lambda p: mlp_apply(p, inputs), params)
            return vjp(u)[0]

        x, _ = matfree_lsmr(vecmat, b, params)
        return x

    return {
        **_ours(jacobian, 0.0, maxiter),
        "lineax LSMR": lineax_solve,
        "matfree lsmr": matfree_solve,
    }


def measure(name, solvers, theta, b, cotangent, repeats):
    rows = []
    for lib, solve in solvers.items():

        def loss(theta, b, solve=solve):
            x = solve(theta, b)
            return sum(
                jnp.vdot(c, xi)
                for c, xi in zip(jax.tree.leaves(cotangent), jax.tree.leaves(x))
            )

        value = jax.jit(solve)
        value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        try:
            compile_v, t_value = timeit(value, theta, b, repeats=repeats)
            compile_g, t_grad = timeit(value_and_grad, theta, b, repeats=repeats)
            solves = krylov_solves(jax.make_jaxpr(value_and_grad)(theta, b).jaxpr)
            solves = "–".join(str(s) for s in sorted(solves))
            row = (lib, t_value * 1e3, t_grad * 1e3, t_grad / t_value, solves)
        except Exception as e:  # a peer failing is a result too
            row = (lib, float("nan"), float("nan"), float("nan"), f"error: {e!r:.60}")
        print(
            f"  {name:28s} {row[0]:26s} value {row[1]:9.1f} ms  value+grad "
            f"{row[2]:9.1f} ms  ratio {row[3]:5.2f}  solves {row[4]}",
            flush=True,
        )
        rows.append((name, *row))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None, help="write a markdown table here")
    args = parser.parse_args()
    m, n, points = (200, 50, 100) if args.small else (2000, 500, 1000)
    rng = np.random.default_rng(1)
    rows = []

    a, b, _ = dense_problem(m, n, 1e2, seed=0)
    c = jnp.asarray(rng.standard_normal(n))
    rows += measure(
        f"dense {m}×{n} cond 1e2",
        dense_solvers(0.0, n, 5 * n),
        jnp.asarray(a),
        jnp.asarray(b),
        c,
        args.repeats,
    )
    a, b, _ = dense_problem(m, n, 1e4, seed=0)
    rows += measure(
        f"dense {m}×{n} cond 1e4, damp 1e-2",
        dense_solvers(1e-2, n, 5 * n),
        jnp.asarray(a),
        jnp.asarray(b),
        c,
        args.repeats,
    )
    sizes = (10, 32, 32, 1) if args.small else (10, 128, 128, 1)
    params, inputs, b = mlp_problem(points, sizes)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    c = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
    rows += measure(
        f"MLP Jacobian {points}×{num_params}",
        mlp_solvers(inputs, 5 * points),
        params,
        b,
        c,
        max(1, args.repeats // 2),
    )

    header = (
        f"Machine: {platform.processor() or platform.machine()}, "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}, float64, "
        f"tolerances {TOL:g}.\n\n"
        "| problem | library | value (ms) | value + grad (ms) | ratio "
        "| Krylov solves |\n"
        "|---|---|---|---|---|---|\n"
    )
    table = header + "".join(
        f"| {p} | {lib} | {tv:.1f} | {tg:.1f} | {r:.2f} | {s} |\n"
        for p, lib, tv, tg, r, s in rows
    )
    if args.output:
        Path(args.output).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
