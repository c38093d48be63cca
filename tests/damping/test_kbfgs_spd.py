"""K-BFGS damping keeps the BFGS inverse SPD over long random pair sequences (Ren thesis).

The single-pair guarantees of DD and D_P D_LM are in ``test_damping.py``; here 1,000 random
pairs (often of negative curvature, scales spread over 6 decades) are applied IN SEQUENCE, each
damped with the current ``H`` and then passed to :func:`qnopt.linalg.bfgs_inverse_update`, as
K-BFGS does for ``H_G`` (Alg. 4 lines 17-18 with DD, Alg. 9 lines 20-21 with D_P D_LM). Every
intermediate ``H`` must stay symmetric positive definite, and every damped pair must satisfy
its algorithm's guarantee. Runs in float64; checks in NumPy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qnopt.damping import double_damping, dp_dlm
from qnopt.linalg import bfgs_inverse_update

N_PAIRS = 1000
MU1 = 0.2
HSET = settings(max_examples=6, deadline=None)


def _random_pairs(seed: int, d: int, n: int = N_PAIRS):
    """``n`` pairs: ``y = c s + noise`` with ``c ~ U(-3, 3)`` (negative curvature half the time)
    and the scales of ``s`` and of the noise log-uniform in ``[1e-3, 1e3]``, independently."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, d)) * 10.0 ** rng.uniform(-3, 3, size=(n, 1))
    noise = rng.normal(size=(n, d)) * 10.0 ** rng.uniform(-3, 3, size=(n, 1))
    return s, rng.uniform(-3, 3, size=(n, 1)) * s + noise


@functools.partial(jax.jit, static_argnames="rule")
def _sequence(H0, S, Y, mu1, mu2, rule):
    """Damps each pair with the current H, then updates H by BFGS; returns every (H, s̃, ỹ)."""
    damp = double_damping if rule == "dd" else dp_dlm

    def body(H, sy):
        s_t, y_t = damp(sy[0], sy[1], H, mu1, mu2)
        H = bfgs_inverse_update(H, s_t, y_t)
        return H, (H, s_t, y_t)

    return jax.lax.scan(body, H0, (S, Y))[1]


def _run(rule, seed, d, mu2):
    S, Y = _random_pairs(seed, d)
    with jax.enable_x64(True):
        Hs, St, Yt = _sequence(jnp.eye(d, dtype=jnp.float64), jnp.asarray(S), jnp.asarray(Y),
                               MU1, mu2, rule)
        Hs, St, Yt = (np.asarray(v, np.float64) for v in (Hs, St, Yt))
    assert Hs.dtype == np.float64 and np.isfinite(Hs).all()
    # Symmetric ...
    asym = np.abs(Hs - Hs.transpose(0, 2, 1)).max(axis=(1, 2))
    assert (asym <= 1e-8 * np.abs(Hs).max(axis=(1, 2))).all()
    # ... positive definite after every one of the N_PAIRS updates.
    lam_min = np.linalg.eigvalsh(Hs).min(axis=1)
    assert (lam_min > 0).all(), f"H lost positive definiteness at update {np.argmin(lam_min)}"
    return S, Y, St, Yt


@HSET
@given(seed=st.integers(0, 2**32 - 1), d=st.integers(2, 6), mu2=st.floats(0.01, 1.0))
def test_double_damping_sequence_keeps_H_spd(seed, d, mu2):
    """Alg. 3 (DD, mu1 = 0.2, mu2 in (0, 1]) + BFGS: H stays SPD; s̃ᵀs̃ / s̃ᵀỹ <= 1/mu2."""
    _, _, St, Yt = _run("dd", seed, d, mu2)
    sts, sty = np.einsum("ni,ni->n", St, St), np.einsum("ni,ni->n", St, Yt)
    assert (sty > 0).all()
    assert (sts / sty <= (1 / mu2) * (1 + 1e-9)).all()


@HSET
@given(seed=st.integers(0, 2**32 - 1), d=st.integers(2, 6),
       mu2=st.floats(-2.0, 2.0).map(lambda e: 10.0 ** e))
def test_dp_dlm_sequence_keeps_H_spd(seed, d, mu2):
    """Alg. 8 (D_P D_LM, mu1 = 0.2, any mu2 > 0) + BFGS: H stays SPD; s̃ᵀỹ >= mu2 ‖s̃‖²."""
    _, Y, St, Yt = _run("dp_dlm", seed, d, mu2)
    sts, sty = np.einsum("ni,ni->n", St, St), np.einsum("ni,ni->n", St, Yt)
    tol = 1e-9 * np.sqrt(sts) * (np.linalg.norm(Y, axis=1) + mu2 * np.sqrt(sts))
    assert (sty > 0).all()
    assert (sty >= mu2 * sts - tol).all()
