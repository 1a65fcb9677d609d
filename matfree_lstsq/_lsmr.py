"""LSMR (Fong & Saunders, 2011)."""

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


class _LSMRState(eqx.Module):
    """Loop state: vectors, then the scalars of the three rotation sequences."""

    step: Int[Array, ""]
    istop: Int[Array, ""]
    done: Bool[Array, ""]
    x: PyTree[Array]
    # Stored Golub–Kahan vectors when reorthogonalising, else None.
    bases: Bases | None
    u: PyTree[Array]
    v: PyTree[Array]
    h: PyTree[Array]
    hbar: PyTree[Array]
    alpha: Float[Array, ""]
    alphabar: Float[Array, ""]
    rho: Float[Array, ""]
    rhobar: Float[Array, ""]
    cbar: Float[Array, ""]
    sbar: Float[Array, ""]
    zeta: Float[Array, ""]
    zetabar: Float[Array, ""]
    # Residual-norm estimate (the rotations Q̂, Q and Q̃ applied to β₁e₁).
    betadd: Float[Array, ""]
    betad: Float[Array, ""]
    rhodold: Float[Array, ""]
    tautildeold: Float[Array, ""]
    thetatilde: Float[Array, ""]
    sum_betacheck2: Float[Array, ""]
    # Norm and condition estimates.
    norm_a2: Float[Array, ""]
    maxrbar: Float[Array, ""]
    minrbar: Float[Array, ""]
    norm_r: Float[Array, ""]
    norm_ar: Float[Array, ""]
    norm_a: Float[Array, ""]
    cond_a: Float[Array, ""]
    norm_x: Float[Array, ""]


class LSMR(AbstractLeastSquaresSolver):
    r"""LSMR: minimises $\|A x - b\|^2 + \lambda^2 \|x - x_0\|^2$ by the Golub–Kahan
    process, with $\|A^\mathsf{H} r\|$ decreasing monotonically.

    Its iterates, stopping tests, `istop` codes and statistics follow SciPy's
    `scipy.sparse.linalg.lsmr` step for step, so iteration counts agree with SciPy's.
    Prefer LSMR to LSQR when the iteration may be stopped early: its stopping test on
    $\|A^\mathsf{H} r\|$ is reliable for inconsistent systems.

    Use it through [`matfree_lstsq.lstsq`][] (damping, initial guess, preconditioning,
    derivatives), or as a lineax solver: `lineax.linear_solve(A, b, solver=LSMR())`
    returns the Moore–Penrose solution $A^+ b$.

    **Arguments:**

    - `atol`, `btol`: stopping tolerances. The iteration stops when
        $\|r\| \le \text{btol}\,\|b\| + \text{atol}\,\|A\|\,\|x\|$ (compatible
        systems) or $\|A^\mathsf{H} r\| \le \text{atol}\,\|A\|\,\|r\|$ (least squares).
        Both default to `1e-6`; about $10^{-d}$ gives $d$ correct digits.
    - `conlim`: stop when the estimated condition number of $A$ exceeds this
        (default `1e8`).
    - `full_rank`: declare that the operator has full rank (full column rank when
        tall, full row rank when wide). Derivatives with respect to the operator
        then need two solves instead of three (one when square and undamped); a
        wrong declaration gives wrong derivatives.
    - `max_steps`: iteration limit; `None` means SciPy's default $\min(m, n)$.

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

    D. C.-L. Fong and M. A. Saunders, *LSMR: An iterative algorithm for sparse
    least-squares problems*, SIAM J. Sci. Comput. 33(5), 2011.

    H. D. Simon and H. Zha, *Low-rank matrix approximation using the Lanczos
    bidiagonalization process with applications*, SIAM J. Sci. Comput. 21(6), 2000.
    """

    atol: float = 1e-6
    btol: float = 1e-6
    conlim: float = 1e8
    max_steps: int | None = None
    full_rank: bool = False
    reorthogonalise: bool | int = False

    name: ClassVar[str] = "LSMR"

    def default_max_steps(self, m: int, n: int) -> int:
        return min(m, n)

    def iterate(self, problem: Problem, max_steps: int):
        s = start(problem, problem.damp.dtype)
        rdtype = s.alpha.dtype
        atol = jnp.asarray(self.atol, rdtype)
        btol = jnp.asarray(self.btol, rdtype)
        ctol = jnp.asarray(1 / self.conlim, rdtype)
        damp = problem.damp
        zero = jnp.zeros((), rdtype)
        one = jnp.ones((), rdtype)
        x0 = tree_zeros(problem.in_structure) if problem.x0 is None else problem.x0
        istop, done = initial_istop(s, max_steps)

        init = _LSMRState(
            step=jnp.zeros((), jnp.int32),
            istop=istop,
            done=done,
            x=x0,
            bases=self.start_bases(s, max_steps),
            u=s.u,
            v=s.v,
            h=s.v,
            hbar=tree_zeros(problem.in_structure),
            alpha=s.alpha,
            alphabar=s.alpha,
            rho=one,
            rhobar=one,
            cbar=one,
            sbar=zero,
            zeta=zero,
            zetabar=s.alpha * s.beta,
            betadd=s.beta,
            betad=zero,
            rhodold=one,
            tautildeold=zero,
            thetatilde=zero,
            sum_betacheck2=zero,
            norm_a2=s.alpha**2,
            maxrbar=zero,
            minrbar=jnp.asarray(jnp.finfo(rdtype).max, rdtype),
            norm_r=s.beta,
            norm_ar=s.alpha * s.beta,
            norm_a=s.alpha,
            cond_a=one,
            norm_x=tree_norm(x0).astype(rdtype),
        )

        def cond_fun(state: _LSMRState):
            return ~state.done

        def body_fun(st: _LSMRState) -> _LSMRState:
            step = st.step + 1
            u, v, alpha, beta, bases = bidiag_step(
                problem, st.u, st.v, st.alpha, st.bases
            )

            # Q̂: rotate the damping term λ into the lower bidiagonal.
            chat, shat, alphahat = sym_ortho(st.alphabar, damp)
            # Q: lower bidiagonal B → upper bidiagonal R.
            rhoold = st.rho
            c, s_, rho = sym_ortho(alphahat, beta)
            thetanew = s_ * alpha
            alphabar = c * alpha
            # Q̄: Rᵀ → R̄ (the second QR factorisation that defines LSMR).
            rhobarold = st.rhobar
            zetaold = st.zeta
            thetabar = st.sbar * rho
            rhotemp = st.cbar * rho
            cbar, sbar, rhobar = sym_ortho(st.cbar * rho, thetanew)
            zeta = cbar * st.zetabar
            zetabar = -sbar * st.zetabar

            # Search directions and iterate.
            hbar = tree_axpy(-(thetabar * rho / (rhoold * rhobarold)), st.hbar, st.h)
            x = tree_axpy(zeta / (rho * rhobar), hbar, st.x)
            h = tree_axpy(-(thetanew / rho), st.h, v)

            # ‖r‖ estimate: apply Q̂, Q, then Q̃ to the right-hand side.
            betaacute = chat * st.betadd
            betacheck = -shat * st.betadd
            betahat = c * betaacute
            betadd = -s_ * betaacute
            thetatildeold = st.thetatilde
            ctildeold, stildeold, rhotildeold = sym_ortho(st.rhodold, thetabar)
            thetatilde = stildeold * rhobar
            rhodold = ctildeold * rhobar
            betad = -stildeold * st.betad + ctildeold * betahat
            tautildeold = (zetaold - thetatildeold * st.tautildeold) / rhotildeold
            taud = (zeta - thetatilde * tautildeold) / rhodold
            sum_betacheck2 = st.sum_betacheck2 + betacheck**2
            norm_r = jnp.sqrt(sum_betacheck2 + (betad - taud) ** 2 + betadd**2)

            # ‖A‖_F and cond(A) estimates.
            norm_a2 = st.norm_a2 + beta**2
            norm_a = jnp.sqrt(norm_a2)
            norm_a2 = norm_a2 + alpha**2
            maxrbar = jnp.maximum(st.maxrbar, rhobarold)
            minrbar = jnp.where(
                step > 1, jnp.minimum(st.minrbar, rhobarold), st.minrbar
            )
            cond_a = jnp.maximum(maxrbar, rhotemp) / jnp.minimum(minrbar, rhotemp)

            norm_ar = jnp.abs(zetabar)
            norm_x = tree_norm(x).astype(rdtype)

            test1 = norm_r / s.norm_b
            denom = norm_a * norm_r
            test2 = jnp.where(
                denom != 0, norm_ar / jnp.where(denom != 0, denom, 1), jnp.inf
            )
            test3 = one / cond_a
            t1 = test1 / (one + norm_a * norm_x / s.norm_b)
            rtol = btol + atol * norm_a * norm_x / s.norm_b
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
            finite = jnp.isfinite(alpha) & jnp.isfinite(beta) & jnp.isfinite(norm_x)
            istop = jnp.where(finite, istop, ISTOP_NONFINITE).astype(jnp.int32)
            return _LSMRState(
                step=step,
                istop=istop,
                done=istop != 0,
                x=x,
                bases=bases,
                u=u,
                v=v,
                h=h,
                hbar=hbar,
                alpha=alpha,
                alphabar=alphabar,
                rho=rho,
                rhobar=rhobar,
                cbar=cbar,
                sbar=sbar,
                zeta=zeta,
                zetabar=zetabar,
                betadd=betadd,
                betad=betad,
                rhodold=rhodold,
                tautildeold=tautildeold,
                thetatilde=thetatilde,
                sum_betacheck2=sum_betacheck2,
                norm_a2=norm_a2,
                maxrbar=maxrbar,
                minrbar=minrbar,
                norm_r=norm_r,
                norm_ar=norm_ar,
                norm_a=norm_a,
                cond_a=cond_a,
                norm_x=norm_x,
            )

        final = jax.lax.while_loop(cond_fun, body_fun, init)
        stats = dict(
            num_steps=final.step,
            istop=final.istop,
            norm_r=final.norm_r,
            norm_Ar=final.norm_ar,
            norm_A=final.norm_a,
            cond_A=final.cond_a,
            norm_x=final.norm_x,
        )
        return final.x, final.istop, stats
