"""Forward solves side by side: SciPy, lineax, matfree and this package, one process.

For every problem and solver: iterations, stop reason, relative error against a dense
reference, µs per iteration, compile time, and the lower bound per iteration (one `A v`
plus one `Aᵀ u` in a compiled loop). Also: throughput of many right-hand sides (`vmap`
against a Python loop), float32 with `jax_enable_x64` off (a subprocess), and a plot of
residual and error against iteration with and without reorthogonalisation.

    python benchmarks/run.py            # everything; writes benchmarks/RESULTS.md
    python benchmarks/run.py --quick    # a smoke test (small problems, no file written)

Problems (DESIGN.md §6): dense `A = U diag(s) Vᵀ` (2000×500 and 500×2000, `s`
geometric from 1 to 1/cond), consistent `b = A x_true` or with a component orthogonal
to range(A) of norm 0.1‖A x_true‖; the same tall matrix with damping 1e-2; a BCOO
`scipy.sparse.random(20000, 5000, density=1e-3)`; the Jacobian of a 10-128-128-1 tanh
MLP on 1000 points with respect to its 18 049 parameters. Tolerances 1e-8 (SciPy,
matfree and this package: `atol = btol`; lineax: `rtol`, `atol = 0`), at most 5000
iterations.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


X64 = "--x64-off" not in sys.argv
if "--multithreaded" not in sys.argv:
    # One thread for every library (OpenBLAS for SciPy, Eigen for XLA): on a shared
    # two-core machine, thread pools contend with other jobs and with each other, and
    # single-threaded times are the stable basis for per-iteration ratios.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )
import jax  # noqa: E402
import jax.flatten_util  # noqa: E402


jax.config.update("jax_enable_x64", X64)

import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
import matfree  # noqa: E402
import matfree.lstsq  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.sparse  # noqa: E402
import scipy.sparse.linalg as spla  # noqa: E402
from jax.experimental import sparse as jsparse  # noqa: E402

import matfree_lstsq as mfl  # noqa: E402


sys.path.insert(0, str(Path(__file__).parent))
from _common import dense_problem, mlp_apply, mlp_problem  # noqa: E402


HERE = Path(__file__).parent
TOL = 1e-8
MAX_STEPS = 5000
MARK_BEGIN = "<!-- benchmarks/run.py: begin -->"
MARK_END = "<!-- benchmarks/run.py: end -->"


# ---------------------------------------------------------------------------------
# Problems: the operator in every form the peers take, a reference and a bound.
# ---------------------------------------------------------------------------------


class Case:
    """One least-squares problem, in the forms each library takes."""

    def __init__(
        self, name, *, kind, b, ref, damp=0.0, dense=None, bcoo=None, sp=None, mlp=None
    ):
        self.name, self.kind, self.b, self.ref, self.damp = name, kind, b, ref, damp
        self.dense, self.bcoo, self.sp, self.mlp = dense, bcoo, sp, mlp
        self.dtype = b.dtype


def dense_case(m, n, cond, dtype, *, consistent=True, damp=0.0):
    a, b, _ = dense_problem(m, n, cond, consistent=consistent)
    # Dense reference in float64 from the SVD: A⁺b, or the damped solution.
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    ref = vt.T @ ((s / (s**2 + damp**2)) * (u.T @ b))
    shape = f"{m}×{n}"
    rhs = "consistent" if consistent else "inconsistent"
    name = f"dense {shape} cond {cond:.0e} {rhs}".replace("e+0", "e")
    if damp:
        name += f", damp {damp:.0e}".replace("e-0", "e-")
    return Case(
        name, kind="dense", b=b.astype(dtype), ref=ref, damp=damp, dense=a.astype(dtype)
    )


def sparse_case(dtype, m=20000, n=5000, density=1e-3):
    rng = np.random.default_rng(0)
    a = scipy.sparse.random(m, n, density=density, format="csr", random_state=rng)
    x_true = rng.standard_normal(n)
    b = a @ x_true + 0.01 * rng.standard_normal(m)
    # Reference by the normal equations in float64 (A is well conditioned).
    ata = (a.T @ a).toarray()
    ref = scipy.linalg.solve(ata, a.T @ b, assume_a="pos")
    a = a.astype(dtype)
    coo = a.tocoo()
    indices = np.stack([coo.row, coo.col], axis=1)
    bcoo = jsparse.BCOO((jnp.asarray(coo.data), jnp.asarray(indices)), shape=a.shape)
    return Case(
        f"sparse {m}×{n} density {density:.0e}".replace("e-0", "e-"),
        kind="sparse",
        b=b.astype(dtype),
        ref=ref,
        sp=a,
        bcoo=bcoo,
    )


def mlp_case(dtype):
    params, inputs, b = mlp_problem(dtype=jnp.float64)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    # Dense Jacobian for SciPy and the reference, row blocks of VJPs (jacfwd over all
    # 18 049 parameters at once would hold 18 049 copies of the hidden activations).
    _, vjp = jax.vjp(lambda f: mlp_apply(unravel(f), inputs), flat)
    eye = jnp.eye(inputs.shape[0], dtype=flat.dtype)
    jac = np.asarray(jax.lax.map(lambda e: vjp(e)[0], eye, batch_size=50))
    ref = np.linalg.pinv(jac) @ np.asarray(b)
    cast = lambda t: jax.tree_util.tree_map(lambda x: x.astype(dtype), t)
    params, inputs = cast(params), cast(inputs)
    m, n = jac.shape
    return Case(
        f"MLP Jacobian {m}×{n}",
        kind="mlp",
        b=np.asarray(b, dtype),
        ref=ref,
        dense=jac.astype(dtype),
        mlp=(params, inputs),
    )


def jacobian_op(params, inputs):
    return lx.JacobianLinearOperator(lambda p, _: mlp_apply(p, inputs), params)


# ---------------------------------------------------------------------------------
# Solvers. Each returns a function of the case giving (x, iterations, stop reason)
# and says whether it is a JAX function (compiled ahead of time and timed).
# ---------------------------------------------------------------------------------


def _flat(x):
    return np.asarray(jax.flatten_util.ravel_pytree(x)[0], np.float64)


def ours(solver_cls, **kw):
    solver = solver_cls(
        atol=kw.pop("tol", TOL),
        btol=kw.pop("btol", TOL),
        max_steps=kw.pop("max_steps", MAX_STEPS),
        **kw,
    )

    def make(case):
        damp = case.damp

        if case.kind == "mlp":
            params, inputs = case.mlp

            def fn(params, b):
                sol = mfl.lstsq(jacobian_op(params, inputs), b, solver, throw=False)
                return sol.value, sol.stats["num_steps"], sol.stats["istop"]

            return fn, (params, jnp.asarray(case.b))
        if case.kind == "sparse":
            a = case.bcoo
            struct = jax.ShapeDtypeStruct((a.shape[1],), a.dtype)

            def fn(data, b):
                op = lx.FunctionLinearOperator(
                    lambda x: jsparse.BCOO((data, a.indices), shape=a.shape) @ x, struct
                )
                sol = mfl.lstsq(op, b, solver, throw=False)
                return sol.value, sol.stats["num_steps"], sol.stats["istop"]

            return fn, (a.data, jnp.asarray(case.b))

        def fn(a, b):
            sol = mfl.lstsq(a, b, solver, damp=damp, throw=False)
            return sol.value, sol.stats["num_steps"], sol.stats["istop"]

        return fn, (jnp.asarray(case.dense), jnp.asarray(case.b))

    return make


def lineax_lsmr(operator_kind, tol=TOL, max_steps=MAX_STEPS, conlim=1e8):
    solver = lx.LSMR(rtol=tol, atol=0.0, max_steps=max_steps, conlim=conlim)

    def make(case):
        damp = case.damp
        if case.kind == "mlp":
            if operator_kind != "jacobian":
                return None
            params, inputs = case.mlp

            def fn(params, b):
                sol = lx.linear_solve(
                    jacobian_op(params, inputs), b, solver, throw=False
                )
                return sol.value, sol.stats["num_steps"], sol.result._value

            return fn, (params, jnp.asarray(case.b))
        if operator_kind == "jacobian":
            return None
        if case.kind == "sparse":
            if operator_kind == "matrix":
                return None  # a dense 20000×5000 matrix: not the point of this row
            a = case.bcoo
            struct = jax.ShapeDtypeStruct((a.shape[1],), a.dtype)

            def fn(data, b):
                op = lx.FunctionLinearOperator(
                    lambda x: jsparse.BCOO((data, a.indices), shape=a.shape) @ x, struct
                )
                sol = lx.linear_solve(op, b, solver, throw=False)
                return sol.value, sol.stats["num_steps"], sol.result._value

            return fn, (a.data, jnp.asarray(case.b))

        n = case.dense.shape[1]

        def fn(a, b):
            # lineax has no damping: solve with the stacked operator [A; λI].
            if damp:
                a = jnp.concatenate([a, damp * jnp.eye(n, dtype=a.dtype)])
                b = jnp.concatenate([b, jnp.zeros(n, b.dtype)])
            if operator_kind == "matrix":
                op = lx.MatrixLinearOperator(a)
            else:
                op = lx.FunctionLinearOperator(
                    lambda x: a @ x, jax.ShapeDtypeStruct((n,), a.dtype)
                )
            sol = lx.linear_solve(op, b, solver, throw=False)
            return sol.value, sol.stats["num_steps"], sol.result._value

        return fn, (jnp.asarray(case.dense), jnp.asarray(case.b))

    return make


def matfree_lsmr(tol=TOL, max_steps=MAX_STEPS, ctol=1e-8):
    solve = matfree.lstsq.lsmr(atol=tol, btol=tol, ctol=ctol, maxiter=max_steps)

    def make(case):
        damp = case.damp
        if case.kind == "mlp":
            params, inputs = case.mlp

            def fn(params, b):
                def vecmat(u, p):
                    _, vjp = jax.vjp(lambda q: mlp_apply(q, inputs), p)
                    return vjp(u)[0]

                x, stats = solve(vecmat, b, params)
                return x, stats["iteration_count"], stats["istop"]

            return fn, (params, jnp.asarray(case.b))
        if case.kind == "sparse":
            a = case.bcoo

            def fn(data, b):
                def vecmat(u, data):
                    return jsparse.BCOO((data, a.indices), shape=a.shape).T @ u

                x, stats = solve(vecmat, b, data)
                return x, stats["iteration_count"], stats["istop"]

            return fn, (a.data, jnp.asarray(case.b))

        def fn(a, b):
            x, stats = solve(lambda u, a: u @ a, b, a, damp=damp)
            return x, stats["iteration_count"], stats["istop"]

        return fn, (jnp.asarray(case.dense), jnp.asarray(case.b))

    return make


def scipy_solver(which):
    def make(case):
        a = case.sp if case.kind == "sparse" else case.dense
        if which == "lsmr":

            def fn():
                out = spla.lsmr(
                    a, case.b, damp=case.damp, atol=TOL, btol=TOL, maxiter=MAX_STEPS
                )
                return out[0], out[2], out[1]
        else:

            def fn():
                out = spla.lsqr(
                    a, case.b, damp=case.damp, atol=TOL, btol=TOL, iter_lim=MAX_STEPS
                )
                return out[0], out[2], out[1]

        return fn, None

    return make


SOLVERS = {
    "SciPy lsmr": scipy_solver("lsmr"),
    "SciPy lsqr": scipy_solver("lsqr"),
    "lineax LSMR (MatrixLinearOperator)": lineax_lsmr("matrix"),
    "lineax LSMR (FunctionLinearOperator)": lineax_lsmr("function"),
    "lineax LSMR (JacobianLinearOperator)": lineax_lsmr("jacobian"),
    "matfree lsmr": matfree_lsmr(),
    "matfree_lstsq LSMR": ours(mfl.LSMR),
    "matfree_lstsq LSQR": ours(mfl.LSQR),
    "matfree_lstsq LSMR, reorth.": ours(mfl.LSMR, reorthogonalise=True),
    "matfree_lstsq LSMR, reorth., tol → ε": ours(
        mfl.LSMR, reorthogonalise=True, tol=0.0, btol=0.0
    ),
}
OURS = "matfree_lstsq LSMR"


# ---------------------------------------------------------------------------------
# Measurement.
# ---------------------------------------------------------------------------------


def _time(call, budget=2.0, max_repeats=5):
    """Median wall time of `call()`; at least one run, more while within `budget`."""
    times = []
    while True:
        t0 = time.perf_counter()
        out = jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
        if len(times) >= max_repeats or sum(times) > budget:
            return out, float(np.median(times))


def measure(name, case, quick):
    made = SOLVERS[name](case)
    if made is None:
        return None
    fn, args = made
    row = dict(problem=case.name, dtype=np.dtype(case.dtype).name, solver=name)
    try:
        if args is None:  # SciPy
            out, t = _time(fn, budget=0.5 if quick else 2.0)
            row["compile_s"] = None
        else:
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(*args).compile()
            row["compile_s"] = time.perf_counter() - t0
            out, t = _time(lambda: compiled(*args), budget=0.5 if quick else 2.0)
    except Exception as e:  # noqa: BLE001 (peers crash on some dtypes: report it)
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        return row
    x, its, istop = out
    x = _flat(x)
    its = int(its)
    row.update(
        iterations=its,
        istop=int(istop),
        rel_error=float(np.linalg.norm(x - case.ref) / np.linalg.norm(case.ref)),
        time_s=t,
        us_per_it=t / max(its, 1) * 1e6,
    )
    return row


def bound_program(case, quick):
    """A compiled loop of `k` steps `v ← Aᵀ(A v)/‖·‖`: the floor per iteration."""
    k = 20 if quick else 100
    if case.kind == "mlp":
        params, inputs = case.mlp

        def loop(params):
            _, jvp = jax.linearize(lambda p: mlp_apply(p, inputs), params)
            vjp = jax.linear_transpose(jvp, params)

            def body(i, v):
                (w,) = vjp(jvp(v))
                norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(w)))
                return jax.tree.map(lambda x: x / norm, w)

            return jax.lax.fori_loop(0, k, body, params)

        args = (params,)
    elif case.kind == "sparse":
        a = case.bcoo

        def loop(data):
            op = jsparse.BCOO((data, a.indices), shape=a.shape)

            def body(i, v):
                w = op.T @ (op @ v)
                return w / jnp.linalg.norm(w)

            return jax.lax.fori_loop(0, k, body, jnp.ones(a.shape[1], data.dtype))

        args = (a.data,)
    else:

        def loop(a):
            def body(i, v):
                w = (a @ v) @ a  # Aᵀu as a row-vector product: no transposed copy
                return w / jnp.linalg.norm(w)

            return jax.lax.fori_loop(0, k, body, jnp.ones(a.shape[1], a.dtype))

        args = (jnp.asarray(case.dense),)
    return jax.jit(loop).lower(*args).compile(), args, k


def bound_per_iteration(case, quick):
    """µs of one `A v` plus one `Aᵀ u` in a compiled loop."""
    compiled, args, k = bound_program(case, quick)
    compiled(*args)
    _, t = _time(lambda: compiled(*args), budget=1.0)
    return t / k * 1e6


def fixed_iteration_solvers(k):
    """The same solvers, made to run exactly `k` iterations (no tolerance stops)."""
    return {
        "matfree_lstsq LSMR": ours(
            mfl.LSMR, tol=0.0, btol=0.0, conlim=1e300, max_steps=k
        ),
        "matfree lsmr": matfree_lsmr(tol=0.0, max_steps=k, ctol=0.0),
        "lineax LSMR (MatrixLinearOperator)": lineax_lsmr(
            "matrix", tol=0.0, max_steps=k, conlim=1e300
        ),
        "lineax LSMR (FunctionLinearOperator)": lineax_lsmr(
            "function", tol=0.0, max_steps=k, conlim=1e300
        ),
        "lineax LSMR (JacobianLinearOperator)": lineax_lsmr(
            "jacobian", tol=0.0, max_steps=k, conlim=1e300
        ),
    }


def per_iteration(case, quick, rounds=5):
    """µs per iteration of each JAX solver over a fixed number of iterations, and of
    the floor `A v` + `Aᵀ u`; rounds interleave the solvers and the minimum over
    rounds is kept (the least disturbed run), plus compile times."""
    k = 20 if quick else (100 if case.kind == "mlp" else 200)
    progs = {}
    out = dict(problem=case.name, dtype=np.dtype(case.dtype).name, k=k)
    for name, factory in fixed_iteration_solvers(k).items():
        made = factory(case)
        if made is None:
            continue
        fn, args = made
        try:
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(*args).compile()
            out[f"compile {name}"] = time.perf_counter() - t0
        except Exception:  # noqa: BLE001 (peers crash on some dtypes)
            continue
        progs[name] = (compiled, args)
    bound, bound_args, bound_k = bound_program(case, quick)
    times = {name: [] for name in [*progs, "bound"]}
    its = {"bound": bound_k}
    for _ in range(2 if quick else rounds):
        for name, (compiled, args) in progs.items():
            t0 = time.perf_counter()
            _, n_it, _ = jax.block_until_ready(compiled(*args))
            times[name].append(time.perf_counter() - t0)
            its[name] = int(n_it)
        t0 = time.perf_counter()
        jax.block_until_ready(bound(*bound_args))
        times["bound"].append(time.perf_counter() - t0)
    for name, ts in times.items():
        out[name] = min(ts) / its[name] * 1e6
        out[f"iterations {name}"] = its[name]
    return out


def cases(dtype, quick):
    """The problems, built one at a time (the large ones hold hundreds of MB)."""
    if quick:
        yield dense_case(200, 50, 1e2, dtype)
        yield dense_case(200, 50, 1e4, dtype)
        return
    if not X64:
        # float32 with x64 off: a subset (the point is that every library runs).
        yield dense_case(2000, 500, 1e2, dtype)
        yield dense_case(2000, 500, 1e4, dtype)
        yield sparse_case(dtype)
        return
    for cond in (1e2, 1e4, 1e6):
        for consistent in (True, False):
            yield dense_case(2000, 500, cond, dtype, consistent=consistent)
    # A wide matrix of full row rank has no inconsistent right-hand side.
    for cond in (1e2, 1e4, 1e6):
        yield dense_case(500, 2000, cond, dtype)
    yield dense_case(2000, 500, 1e4, dtype, damp=1e-2)
    yield sparse_case(dtype)
    yield mlp_case(dtype)


def run_table(dtypes, quick, log):
    """All solvers on all problems; fixed-iteration timings on some of them."""
    rows, per_it = [], []
    for dtype in dtypes:
        for case in cases(dtype, quick):
            for name in SOLVERS:
                row = measure(name, case, quick)
                if row is not None:
                    rows.append(row)
                    log(_fmt_row(row))
            if quick or any(
                key in case.name for key in ("cond 1e2 consistent", "sparse", "MLP")
            ):
                per_it.append(per_iteration(case, quick))
                log(str(per_it[-1]))
    return rows, per_it


# ---------------------------------------------------------------------------------
# Many right-hand sides, the residual plot, float32 with x64 off.
# ---------------------------------------------------------------------------------


def many_rhs(quick, num=32):
    m, n = (200, 50) if quick else (2000, 500)
    a, b, _ = dense_problem(m, n, 1e2)
    rng = np.random.default_rng(1)
    bs = jnp.asarray(a @ rng.standard_normal((n, num)), a.dtype).T
    a = jnp.asarray(a)
    solver = mfl.LSMR(atol=TOL, btol=TOL, max_steps=MAX_STEPS)
    one = jax.jit(lambda a, b: mfl.lstsq(a, b, solver).value)
    batched = jax.jit(
        jax.vmap(lambda a, b: mfl.lstsq(a, b, solver).value, in_axes=(None, 0))
    )
    one(a, bs[0])
    batched(a, bs)
    _, t_one = _time(lambda: one(a, bs[0]))
    _, t_loop = _time(lambda: [one(a, bi) for bi in bs], max_repeats=3)
    _, t_vmap = _time(lambda: batched(a, bs), max_repeats=3)
    return dict(size=f"{m}×{n}", num=num, one=t_one, loop=t_loop, vmap=t_vmap)


def residual_curves(quick):
    """‖b − A x_k‖/‖b‖ and ‖x_k − x*‖/‖x*‖ against k for cond 1e4 (consistent)."""
    m, n = (200, 50) if quick else (2000, 500)
    case = dense_case(m, n, 1e4, np.float64)
    a, b = jnp.asarray(case.dense), jnp.asarray(case.b)
    ks = np.unique(np.geomspace(5, 10 * n if not quick else 200, 14).astype(int))
    curves = {}
    for label, reorth in (("plain", False), ("reorthogonalised", True)):
        res, err = [], []
        for k in ks:
            solver = mfl.LSMR(
                atol=0.0,
                btol=0.0,
                conlim=1e30,
                max_steps=int(k),
                reorthogonalise=reorth,
            )
            x = np.asarray(mfl.lstsq(a, b, solver, throw=False).value)
            res.append(np.linalg.norm(case.dense @ x - case.b) / np.linalg.norm(case.b))
            err.append(np.linalg.norm(x - case.ref) / np.linalg.norm(case.ref))
        curves[label] = (ks, np.array(res), np.array(err))
    return case.name, curves


def plot_curves(title, curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for label, (ks, res, err) in curves.items():
        axes[0].loglog(ks, res, "o-", label=label)
        axes[1].loglog(ks, err, "o-", label=label)
    axes[0].set_ylabel("‖b − A x_k‖ / ‖b‖")
    axes[1].set_ylabel("‖x_k − x*‖ / ‖x*‖")
    for ax in axes:
        ax.set_xlabel("iteration k")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"LSMR on {title}, float64")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def x64_off_rows(quick):
    cmd = [sys.executable, __file__, "--x64-off", "--json"]
    cmd += (
        ["--multithreaded"]
        if "--multithreaded" in sys.argv
        else [] + (["--quick"] if quick else [])
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"x64-off subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def _fmt_row(r):
    if "error" in r:
        head = f"| {r['problem']} | {r['dtype']} | {r['solver']} |"
        return f"{head} crashed: {r['error']} |||||"
    return (
        f"| {r['problem']} | {r['dtype']} | {r['solver']} | {r['iterations']} | "
        f"{r['istop']} | {r['rel_error']:.1e} | {r['us_per_it']:.0f} | "
        f"{_fmt(r.get('compile_s'), '.2f')} | {r['time_s']:.3f} |"
    )


HEADER = (
    "| problem | dtype | solver | iterations | istop | rel. error | µs/it | "
    "compile (s) | time (s) |\n|---|---|---|---|---|---|---|---|---|"
)


def per_iteration_summary(per_it):
    """Fixed-iteration timings: this package's LSMR against the floor and its peers."""
    names = {
        "matfree": "matfree lsmr",
        "lineax Matrix": "lineax LSMR (MatrixLinearOperator)",
        "lineax Function": "lineax LSMR (FunctionLinearOperator)",
        "lineax Jacobian": "lineax LSMR (JacobianLinearOperator)",
    }
    out = [
        "| problem | dtype | k | floor Av+Aᵀu (µs) | this package (µs/it) | "
        "ours / floor | "
        + " | ".join(f"{short} / ours" for short in names)
        + " | compile: ours (s) | compile: fastest peer (s) |",
        "|---|---|---|---|---|---|" + "---|" * len(names) + "---|---|",
    ]
    for r in per_it:
        me = r.get(OURS)
        if me is None:
            continue
        ratios = [
            f"{r[full] / me:.2f}" if full in r else "—" for full in names.values()
        ]
        peers = [r[f"compile {full}"] for full in names.values() if full in r]
        fastest = f"{min(peers):.2f}" if peers else "—"
        out.append(
            f"| {r['problem']} | {r['dtype']} | {r['k']} | {r['bound']:.0f} | "
            f"{me:.0f} | {me / r['bound']:.2f} | "
            + " | ".join(ratios)
            + f" | {r[f'compile {OURS}']:.2f} | {fastest} |"
        )
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small smoke test")
    parser.add_argument(
        "--x64-off",
        action="store_true",
        help="(internal) float32 with x64 off, rows as JSON",
    )
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-float32", action="store_true")
    parser.add_argument(
        "--multithreaded",
        action="store_true",
        help="leave BLAS and XLA thread pools at their defaults",
    )
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()

    if args.x64_off:
        rows, per_it = run_table([np.float32], args.quick, lambda s: None)
        print(json.dumps(dict(rows=rows, per_it=per_it)))
        return

    print(HEADER)
    dtypes = [np.float64] if args.no_float32 else [np.float64, np.float32]
    rows, per_it = run_table(dtypes, args.quick, print)
    off = dict(rows=[], per_it=[]) if args.no_float32 else x64_off_rows(args.quick)
    rows32 = off["rows"]
    for r in rows32 + off["per_it"]:
        r["dtype"] = "float32 (x64 off)"
    for r in rows32:
        print(_fmt_row(r))
    per_it += off["per_it"]
    rhs = many_rhs(args.quick)
    title, curves = residual_curves(args.quick)

    plot = HERE / "residuals_cond1e4.png"
    summary = per_iteration_summary(per_it)
    print(summary)
    print(json.dumps(rhs))
    if args.quick:
        return
    plot_curves(title, curves, plot)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    section = [
        MARK_BEGIN,
        "## Forward solves side by side",
        "",
        "Command (also `nox -s bench`):",
        "",
        "```bash",
        "python benchmarks/run.py",
        "```",
        "",
        f"Run of {datetime.date.today()}, {platform.processor() or platform.machine()}"
        f", {os.cpu_count()} CPU cores, jax {jax.__version__}, lineax "
        f"{lx.__version__ if hasattr(lx, '__version__') else '?'}, matfree "
        f"{importlib.metadata.version('matfree')}, SciPy {scipy.__version__}; load "
        f"average at the end {load:.1f}. Problems and tolerances: see the docstring "
        "of `benchmarks/run.py`. `istop` follows SciPy's codes (lineax: its "
        '`RESULTS` index, 0 = success; 7 = `max_steps`). "reorth., tol → ε" runs '
        "with `atol = btol = 0`, i.e. until the machine-precision tests stop it. "
        "Relative error is against a dense float64 reference (SVD, pseudo-inverse, "
        "or normal equations for the sparse problem).",
        "",
        "### Per iteration",
        "",
        "Each JAX solver runs exactly k iterations (all tolerances 0); the solvers "
        "and the floor (a compiled loop of `v ← Aᵀ(A v)/‖·‖`) are interleaved over "
        "5 rounds and the fastest round of each is kept, which is robust to other "
        "jobs on the machine. Ratios above 1 in the peer columns mean this package "
        "is faster. Compile time: lowering and compiling the k-iteration solve.",
        "",
        summary,
        "",
        "### All runs",
        "",
        HEADER,
        *[_fmt_row(r) for r in rows + rows32],
        "",
        "### Many right-hand sides",
        "",
        f"{rhs['num']} consistent right-hand sides, dense {rhs['size']} cond 1e2, "
        "this package's LSMR:",
        "",
        "| one solve (s) | Python loop (s) | `vmap` (s) | loop / vmap |",
        "|---|---|---|---|",
        f"| {rhs['one']:.3f} | {rhs['loop']:.3f} | {rhs['vmap']:.3f} | "
        f"{rhs['loop'] / rhs['vmap']:.1f} |",
        "",
        "### Residual and error against iteration",
        "",
        f"![residual and error against iteration]({plot.name})",
        "",
        f"{title}: LSMR with `atol = btol = 0` stopped after k steps.",
        "",
        "| k | " + " | ".join(str(k) for k in curves["plain"][0]) + " |",
        "|---|" + "---|" * len(curves["plain"][0]),
        *[
            f"| error, {label} | " + " | ".join(f"{e:.1e}" for e in err) + " |"
            for label, (_, _, err) in curves.items()
        ],
        MARK_END,
    ]
    path = Path(args.output)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = "\n".join(section)
    if MARK_BEGIN in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        title_end = text.index("\n", text.index("# ")) + 1
        intro_end = text.find("\n## ")
        at = intro_end + 1 if intro_end != -1 else len(text)
        at = max(at, title_end)
        text = text[:at] + block + "\n\n" + text[at:]
    path.write_text(text)
    print(f"wrote {path} and {plot}")


if __name__ == "__main__":
    main()
