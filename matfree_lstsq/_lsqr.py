"""LSQR (Paige & Saunders, 1982)."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._operator import tree_axpy, tree_norm, tree_zeros
from ._solution import ISTOP_NONFINITE, stopping_code
from ._solver import (
    AbstractLeastSquaresSolver,
    Bases,
    Problem,
    bidiag_step,
    initial_istop,
    start,
    sym_ortho,
)


class _LSQRState(eqx.Module):
    step: Int[Array, ""]
    istop: Int[Array, ""]
    done: Bool[Array, ""]
    x: PyTree[Array]
    # Stored Golub–Kahan vectors when reorthogonalising, else None.
    bases: Bases | None
    u: PyTree[Array]
    v: PyTree[Array]
    w: PyTree[Array]
    alpha: Float[Array, ""]
    rhobar: Float[Array, ""]
    phibar: Float[Array, ""]
    # ‖x − x0‖ estimate: a rotation on the right of the upper bidiagonal R.
    cs2: Float[Array, ""]
    sn2: Float[Array, ""]
    z: Float[Array, ""]
    xxnorm: Float[Array, ""]
    # ‖D‖_F² of the direction matrix, for cond(A); running damping residual.
    ddnorm: Float[Array, ""]
    res2: Float[Array, ""]
    norm_a: Float[Array, ""]
    norm_r: Float[Array, ""]
    norm_ar: Float[Array, ""]
    cond_a: Float[Array, ""]


class LSQR(AbstractLeastSquaresSolver):
    r"""LSQR: minimises $\|A x - b\|^2 + \lambda^2 \|x - x_0\|^2$ by the Golub–Kahan
    process; mathematically equivalent to conjugate gradients on the normal equations,
    with $\|r\|$ decreasing monotonically.

    Its iterates, stopping tests, `istop` codes and statistics follow SciPy's
    `scipy.sparse.linalg.lsqr` step for step. Use it through
    [`matfree_lstsq.lstsq`][] or as a lineax solver (Moore–Penrose solution).

    **Arguments:**

    - `atol`, `btol`: stopping tolerances, with the same meaning as for
        [`matfree_lstsq.LSMR`][] (defaults `1e-6`).
    - `conlim`: stop when the estimated condition number of $[A; \lambda I]$ exceeds
        this (default `1e8`).
    - `full_rank`: declare that the operator has full rank (full column rank when
        tall, full row rank when wide). Derivatives with respect to the operator
        then need two solves instead of three (one when square and undamped); a
        wrong declaration gives wrong derivatives.
    - `max_steps`: iteration limit; `None` means SciPy's default $2n$ for an
        $m \times n$ operator.

    - `reorthogonalise`: `False` (default) runs the plain short recurrences, as
        SciPy does. `True` stores the Golub–Kahan vectors of the shorter side ($v_k$
        when $m \ge n$, $u_k$ when $m < n$) and orthogonalises each new one against
        all stored ones (classical Gram–Schmidt, twice; one-sided
        reorthogonalisation as analysed by Simon and Zha); an int $w$ does so
        against the $w$ most recent ones only (a local window, as Fong and Saunders'
        `localSize`). Turn it on for ill-conditioned problems, where the plain
        recurrences lose orthogonality and stall: with full reorthogonalisation
        the iteration behaves as in exact arithmetic and ends within about
        $\min(m, n)$ steps. Costs $s \min(m, n)$ extra numbers of memory, with
        $s = \min(\text{max\_steps}, m, n) + 1$ for `True` and $s = w$ for a
        window, and about $4 \min(k, s) \min(m, n)$ extra multiply–adds at step
        $k$; see the Performance page for when it pays.

    **References:**

    C. C. Paige and M. A. Saunders, *LSQR: An algorithm for sparse linear equations
    and sparse least squares*, ACM Trans. Math. Softw. 8(1), 1982.

    H. D. Simon and H. Zha, *Low-rank matrix approximation using the Lanczos
    bidiagonalization process with applications*, SIAM J. Sci. Comput. 21(6), 2000.
    """

    atol: float = 1e-6
    btol: float = 1e-6
    conlim: float = 1e8
    max_steps: int | None = None
    full_rank: bool = False
    reorthogonalise: bool | int = False

    name: ClassVar[str] = "LSQR"

    def default_max_steps(self, m: int, n: int) -> int:
        return 2 * n

    def iterate(self, problem: Problem, max_steps: int):
        s = start(problem, problem.damp.dtype)
        rdtype = s.alpha.dtype
        eps = jnp.asarray(jnp.finfo(rdtype).eps, rdtype)
        atol = jnp.asarray(self.atol, rdtype)
        btol = jnp.asarray(self.btol, rdtype)
        ctol = jnp.asarray(1 / self.conlim, rdtype)
        damp = problem.damp
        dampsq = damp**2
        zero = jnp.zeros((), rdtype)
        one = jnp.ones((), rdtype)
        x0 = tree_zeros(problem.in_structure) if problem.x0 is None else problem.x0
        istop, done = initial_istop(s, max_steps)

        init = _LSQRState(
            step=jnp.zeros((), jnp.int32),
            istop=istop,
            done=done,
            x=x0,
            bases=self.start_bases(s, max_steps),
            u=s.u,
            v=s.v,
            w=s.v,
            alpha=s.alpha,
            rhobar=s.alpha,
            phibar=s.beta,
            cs2=-one,
            sn2=zero,
            z=zero,
            xxnorm=zero,
            ddnorm=zero,
            res2=zero,
            norm_a=zero,
            norm_r=s.beta,
            norm_ar=s.alpha * s.beta,
            cond_a=zero,
        )

        def cond_fun(state: _LSQRState):
            return ~state.done

        def body_fun(st: _LSQRState) -> _LSQRState:
            step = st.step + 1
            u, v, alpha, beta, bases = bidiag_step(
                problem, st.u, st.v, st.alpha, st.bases
            )
            # SciPy updates ‖A‖ only when β > 0 (with the old α).
            norm_a = jnp.where(
                beta > 0,
                jnp.sqrt(st.norm_a**2 + st.alpha**2 + beta**2 + dampsq),
                st.norm_a,
            )

            # Eliminate the damping term with a rotation (identity when λ = 0).
            rhobar1 = jnp.sqrt(st.rhobar**2 + dampsq)
            safe = jnp.where(rhobar1 > 0, rhobar1, 1)
            cs1 = jnp.where(damp > 0, st.rhobar / safe, one)
            sn1 = jnp.where(damp > 0, damp / safe, zero)
            rhobar1 = jnp.where(damp > 0, rhobar1, st.rhobar)
            psi = sn1 * st.phibar
            phibar = cs1 * st.phibar

            # Eliminate the subdiagonal β of the lower bidiagonal.
            cs, sn, rho = sym_ortho(rhobar1, beta)
            theta = sn * alpha
            rhobar = -cs * alpha
            phi = cs * phibar
            phibar = sn * phibar
            tau = sn * phi

            # Update x and the direction w.
            x = tree_axpy(phi / rho, st.w, st.x)
            w = tree_axpy(-theta / rho, st.w, v)
            ddnorm = st.ddnorm + (tree_norm(st.w).astype(rdtype) / rho) ** 2

            # ‖x − x0‖ estimate from a rotation on the right of R.
            delta = st.sn2 * rho
            gambar = -st.cs2 * rho
            rhs = phi - delta * st.z
            zbar = rhs / gambar
            xnorm = jnp.sqrt(st.xxnorm + zbar**2)
            gamma = jnp.sqrt(gambar**2 + theta**2)
            cs2 = gambar / gamma
            sn2 = theta / gamma
            z = rhs / gamma
            xxnorm = st.xxnorm + z**2

            cond_a = norm_a * jnp.sqrt(ddnorm)
            res2 = st.res2 + psi**2
            norm_r = jnp.sqrt(phibar**2 + res2)
            norm_ar = alpha * jnp.abs(tau)

            test1 = norm_r / s.norm_b
            test2 = norm_ar / (norm_a * norm_r + eps)
            test3 = one / (cond_a + eps)
            t1 = test1 / (one + norm_a * xnorm / s.norm_b)
            rtol = btol + atol * norm_a * xnorm / s.norm_b
            istop = stopping_code(
                test1=test1,
                test2=test2,
                test3=test3,
                t1=t1,
                rtol=rtol,
                atol=atol,
                ctol=ctol,
                at_max_steps=step >= max_steps,
            )
            finite = jnp.isfinite(alpha) & jnp.isfinite(beta) & jnp.isfinite(xnorm)
            istop = jnp.where(finite, istop, ISTOP_NONFINITE).astype(jnp.int32)
            return _LSQRState(
                step=step,
                istop=istop,
                done=istop != 0,
                x=x,
                bases=bases,
                u=u,
                v=v,
                w=w,
                alpha=alpha,
                rhobar=rhobar,
                phibar=phibar,
                cs2=cs2,
                sn2=sn2,
                z=z,
                xxnorm=xxnorm,
                ddnorm=ddnorm,
                res2=res2,
                norm_a=norm_a,
                norm_r=norm_r,
                norm_ar=norm_ar,
                cond_a=cond_a,
            )

        final = jax.lax.while_loop(cond_fun, body_fun, init)
        stats = dict(
            num_steps=final.step,
            istop=final.istop,
            norm_r=final.norm_r,
            norm_Ar=final.norm_ar,
            norm_A=final.norm_a,
            cond_A=final.cond_a,
            norm_x=tree_norm(final.x).astype(rdtype),
        )
        return final.x, final.istop, stats
