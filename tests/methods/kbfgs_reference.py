"""Hand-written float64 NumPy references for K-BFGS / K-BFGS(L) and the K-FAC direction.

Plain loops and explicit matrices, following the pseudo-code of the Ren thesis
(Y. Ren, "Using Second-Order Information in Training Deep Neural Networks", PhD thesis, Columbia University (2022)) line by line:

* Alg. 1 (forward/backward of an MLP): :func:`mlp_forward_backward`;
* Alg. 3 (double damping, DD): :func:`dd`;  Alg. 8 (``D_P D_LM``): :func:`dp_dlm`;
* Alg. 4 (K-BFGS / K-BFGS(L) for MLPs, Ch. 2): :func:`alg4_init`, :func:`alg4_step`;
* Alg. 9 (K-BFGS / K-BFGS(L) for CNNs, Ch. 3) on a one-conv + one-dense network:
  :func:`cnn_forward_backward`, :func:`alg9_init`, :func:`alg9_step`;
* Alg. 12 line 19 (K-FAC damped Kronecker solve): :func:`kfac_direction`.

No JAX, no qnopt. Conventions shared with qnopt (notes/api_issue4.md):

* params are Flax-layout dicts ``{"Dense_0": {"kernel": (d_in, d_out), "bias": (d_out,)}, ...}``
  (conv kernels ``(kh, kw, c_in, c_out)``);
* the layer matrix is ``W = [kernel.reshape(-1, d_out).T, bias[:, None]]`` of shape
  ``(d_out, d_in + 1)``, acting on ``ā = [a, 1]``;
* ``vec`` stacks columns, so ``vec(G X A) = (Aᵀ ⊗ G) vec(X)``;
* losses: ``"mse"`` = mean over the batch of ``½‖out − t‖²``, ``"softmax_ce"`` = mean over the
  batch of ``−log softmax(out)[t]`` with integer labels ``t``;
* ``g`` (``Dh``) is always the PER-EXAMPLE pre-activation gradient ``∂f(n)/∂h(n)``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "bfgs_update",
    "lbfgs_matrix",
    "dd",
    "dp_dlm",
    "layer_matrix",
    "layer_names",
    "from_layer_matrix",
    "mlp_forward_backward",
    "alg4_init",
    "alg4_step",
    "conv_patches",
    "cnn_forward_backward",
    "cnn_damping",
    "alg9_init",
    "alg9_step",
    "kfac_direction",
]


# ----------------------------------------------------------------------------
# Small building blocks
# ----------------------------------------------------------------------------

def bfgs_update(H, s, y):
    """BFGS update of an inverse-Hessian approximation (thesis eq. 2.6 / 3.11)::

        H⁺ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ,   ρ = 1 / sᵀy.

    The pair is used only if ``sᵀy > 0``; otherwise ``H`` is returned unchanged.
    """
    sy = float(s @ y)
    if not sy > 0:
        return H
    rho = 1.0 / sy
    V = np.eye(len(s)) - rho * np.outer(y, s)
    return V.T @ H @ V + rho * np.outer(s, s)


def lbfgs_matrix(pairs, d, gamma):
    """The L-BFGS matrix, materialised: BFGS applied in chronological order to ``γ I``."""
    H = gamma * np.eye(d)
    for s, y in pairs:
        H = bfgs_update(H, s, y)
    return H


def _powell_h(s, y, H, mu1):
    """Powell's damping on H: Alg. 3 lines 2-3 = Alg. 8 lines 2-7."""
    Hy = H @ y
    sy, yHy = float(s @ y), float(y @ Hy)
    if sy < mu1 * yHy:                                    # Alg. 3 line 2 / Alg. 8 line 2
        theta1 = (1 - mu1) * yHy / (yHy - sy)             # Alg. 8 line 3
    else:
        theta1 = 1.0                                      # Alg. 8 line 5
    return theta1 * s + (1 - theta1) * Hy                 # Alg. 3 line 3 / Alg. 8 line 7


def dd(s, y, H, mu1, mu2):
    """Double damping, thesis Alg. 3 (lines 1-6). Returns ``(s̃, ỹ)``."""
    s_t = _powell_h(s, y, H, mu1)                         # lines 2-3: Powell's damping on H
    sts, sty = float(s_t @ s_t), float(s_t @ y)
    if sty < mu2 * sts:                                   # line 4
        theta2 = (1 - mu2) * sts / (sts - sty)
    else:
        theta2 = 1.0
    y_t = theta2 * y + (1 - theta2) * s_t                 # line 5: Powell's damping with B = I
    return s_t, y_t                                       # line 6


def dp_dlm(s, y, H, mu1, mu2):
    """``D_P D_LM``, thesis Alg. 8 (lines 1-9). Returns ``(s̃, ỹ)``."""
    s_t = _powell_h(s, y, H, mu1)                         # lines 2-7
    return s_t, y + mu2 * s_t                             # line 8: LM damping on H⁻¹


def layer_matrix(p):
    """``{"kernel", "bias"}`` → ``W = [kernel.reshape(-1, d_out).T, bias]`` ``(d_out, d_in+1)``."""
    k = np.asarray(p["kernel"], np.float64)
    k = k.reshape(-1, k.shape[-1])
    return np.concatenate([k.T, np.asarray(p["bias"], np.float64)[:, None]], axis=1)


def from_layer_matrix(W, kernel_shape):
    """Inverse of :func:`layer_matrix`."""
    return {"kernel": W[:, :-1].T.reshape(kernel_shape), "bias": W[:, -1].copy()}


def _with_ones(a):
    """``ā = [a, 1]`` along the last axis."""
    return np.concatenate([a, np.ones(a.shape[:-1] + (1,))], axis=-1)


def _loss_and_output_grad(out, t, loss):
    """Per-example losses ``f(n)`` and ``Da_L(n) = ∂f(n)/∂out(n)`` (Alg. 1 line 3)."""
    if loss == "mse":
        r = out - t
        return 0.5 * np.sum(r * r, axis=1), r
    if loss == "softmax_ce":
        z = out - out.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        idx = np.arange(len(out))
        onehot = np.zeros_like(out)
        onehot[idx, np.asarray(t)] = 1.0
        return -logp[idx, np.asarray(t)], np.exp(logp) - onehot
    raise ValueError(loss)


# ----------------------------------------------------------------------------
# Alg. 1: forward / backward pass of an MLP (tanh hidden layers, linear output)
# ----------------------------------------------------------------------------

def mlp_forward_backward(params, layers, x, t, loss):
    """Thesis Alg. 1 on every example of the batch.

    Args:
      params: Flax-layout params; ``layers``: the layer names in order (e.g. ``["Dense_0",
        "Dense_1"]``). Hidden activations ``tanh``, last layer linear.
      x: ``(N, d_0)`` inputs; t: targets ``(N, d_L)`` (mse) or integer labels ``(N,)``.
      loss: ``"mse"`` or ``"softmax_ce"``.

    Returns:
      ``(stats, value)``: ``stats[name]`` holds ``a`` ``(N, d_in)`` (layer input), ``h`` ``(N,
      d_out)`` (pre-activation), ``g`` ``(N, d_out)`` per-example ``∂f(n)/∂h(n)``, and
      ``kernel_grad`` / ``bias_grad`` of the MEAN loss; ``value`` is the mean loss.
    """
    x = np.asarray(x, np.float64)
    N, L = x.shape[0], len(layers)
    Ws = [layer_matrix(params[name]) for name in layers]
    a, acts, pre = x, [], []
    for l in range(L):                                    # line 2
        acts.append(a)
        h = _with_ones(a) @ Ws[l].T                       # h_l = W_l ā_{l-1}
        pre.append(h)
        a = np.tanh(h) if l < L - 1 else h                # a_l = φ_l(h_l)
    f, Da = _loss_and_output_grad(a, t, loss)             # line 3
    stats = {}
    for l in reversed(range(L)):                          # line 4
        dphi = 1 - np.tanh(pre[l]) ** 2 if l < L - 1 else np.ones_like(pre[l])
        g = Da * dphi                                     # g_l = Da_l ⊙ φ'(h_l)
        DW = g.T @ _with_ones(acts[l]) / N                # mean_n g_l ā_{l-1}ᵀ
        Da = g @ Ws[l][:, :-1]                            # Da_{l-1} = W_lᵀ g_l (bias column dropped)
        kshape = np.shape(params[layers[l]]["kernel"])
        gk = from_layer_matrix(DW, kshape)
        stats[layers[l]] = dict(a=acts[l], h=pre[l], g=g, kernel_grad=gk["kernel"],
                                bias_grad=gk["bias"])
    return stats, float(np.mean(f))


# ----------------------------------------------------------------------------
# Alg. 4: K-BFGS / K-BFGS(L) (Ch. 2)
# ----------------------------------------------------------------------------

def layer_names(params):
    """The layer names of an MLP's params in network order (``Dense_0, Dense_1, ...``)."""
    return sorted(params, key=lambda n: int(n.rsplit("_", 1)[1]))


def alg4_init(params, damping, A0=None):
    """Alg. 4 line 3: ĝ = 0, Â = A0 (warm start, zeros if None), H_a = (Â + λ_A I)⁻¹, H_g = I.

    ``A0`` is ``{name: (d_in+1, d_in+1)}`` or None. Also ``s_G = y_G = 0`` (line 16 starts the
    moving average from zero) and an empty list of L-BFGS pairs.
    """
    lam_A = np.sqrt(damping)                              # line 2
    state = {}
    for name in layer_names(params):
        W = layer_matrix(params[name])
        d_out, da = W.shape
        A = np.zeros((da, da)) if A0 is None else np.asarray(A0[name], np.float64)
        state[name] = dict(momentum=np.zeros_like(W), A=A,
                           H_A=np.linalg.inv(A + lam_A * np.eye(da)), H_G=np.eye(d_out),
                           s_G=np.zeros(d_out), y_G=np.zeros(d_out), pairs=[])
    return state


def alg4_step(params, ref_state, x, t, lr, damping, loss, beta=0.9, mu1=0.2,
              bfgs="bfgs", memory=100):
    """One iteration (lines 5-24) of thesis Alg. 4 on the batch ``(x, t)``.

    ``bfgs="lbfgs"`` keeps the newest ``memory`` damped pairs and materialises
    ``H_g`` = BFGS applied in order to ``γ I`` with ``γ = 1`` (line 10). Returns
    ``(new_params, new_state)``; the state's ``H_G`` is always the materialised matrix.
    """
    lam_A = lam_G = np.sqrt(damping)                      # line 2
    layers = layer_names(params)
    stats, _ = mlp_forward_backward(params, layers, x, t, loss)          # line 6
    new_params, state = {}, {}
    for name in layers:                                   # lines 7-12
        st, p_ = ref_state[name], params[name]
        gbar = layer_matrix({"kernel": stats[name]["kernel_grad"], "bias": stats[name]["bias_grad"]})
        mom = beta * st["momentum"] + (1 - beta) * gbar   # line 8
        p = st["H_G"] @ mom @ st["H_A"]                   # line 9 (line 10: L-BFGS from I)
        W = layer_matrix(p_) - lr * p                     # line 11
        new_params[name] = from_layer_matrix(W, np.shape(p_["kernel"]))
        state[name] = dict(st, momentum=mom)
    stats_p, _ = mlp_forward_backward(new_params, layers, x, t, loss)    # line 13
    for name in layers:                                   # lines 14-24
        st, s1, s2 = state[name], stats[name], stats_p[name]
        # line 16: moving averages of the mean changes of h and of per-example g.
        s_G = beta * st["s_G"] + (1 - beta) * (s2["h"].mean(0) - s1["h"].mean(0))
        y_G = beta * st["y_G"] + (1 - beta) * (s2["g"].mean(0) - s1["g"].mean(0))
        s_t, y_t = dd(s_G, y_G, st["H_G"], mu1, lam_G)    # line 17
        pairs = list(st["pairs"])
        if bfgs == "bfgs":                                # line 18
            H_G = bfgs_update(st["H_G"], s_t, y_t)
        else:
            if s_t @ y_t > 0:
                pairs = (pairs + [(s_t, y_t)])[-memory:]
            H_G = lbfgs_matrix(pairs, len(s_t), 1.0)
        abar = _with_ones(s1["a"])                        # ā from the first pass (line 6)
        A = beta * st["A"] + (1 - beta) * abar.T @ abar / len(abar)      # line 20
        A_LM = A + lam_A * np.eye(len(A))                 # line 21
        s_A = st["H_A"] @ abar.mean(0)                    # line 22
        y_A = A_LM @ s_A
        H_A = bfgs_update(st["H_A"], s_A, y_A)                   # line 23
        state[name] = dict(momentum=st["momentum"], A=A, H_A=H_A, H_G=H_G, s_G=s_G, y_G=y_G,
                           pairs=pairs)
    return new_params, state


# ----------------------------------------------------------------------------
# A tiny CNN: Conv (VALID, stride 1) -> tanh -> flatten -> Dense
# ----------------------------------------------------------------------------

def conv_patches(x, kh, kw):
    """Patches ``(N, T, kh·kw·c_in)`` of an NHWC input for a VALID, stride-1 conv.

    Position ``t = p·W_out + q`` (row-major over the output image, as Flax flattens NHWC);
    the patch vector is ordered ``(i, j, c)``, i.e. like ``kernel.reshape(kh·kw·c_in, c_out)``.
    """
    N, H, W, C = x.shape
    Ho, Wo = H - kh + 1, W - kw + 1
    P = np.zeros((N, Ho * Wo, kh * kw * C))
    for p in range(Ho):
        for q in range(Wo):
            for i in range(kh):
                for j in range(kw):
                    for c in range(C):
                        P[:, p * Wo + q, (i * kw + j) * C + c] = x[:, p + i, q + j, c]
    return P


def cnn_forward_backward(params, x, t, loss, conv="Conv_0", dense="Dense_0"):
    """Forward/backward (Alg. 1 extended to a conv layer, thesis eq. 3.1) of
    ``Dense(flatten(tanh(Conv(x))))``.

    Returns ``(stats, value)`` with, per layer, ``a`` ``(N, T, d_in)`` (conv patches; ``T = 1``
    for the dense layer), ``h`` and ``g`` ``(N, T, d_out)`` (``g = Dh_t(n) = ∂f(n)/∂h_t(n)``
    per example), ``kernel_grad`` / ``bias_grad`` of the MEAN loss, and ``T``.
    """
    x = np.asarray(x, np.float64)
    N = x.shape[0]
    K1 = np.asarray(params[conv]["kernel"], np.float64)
    kh, kw, _, c_out = K1.shape
    W1, W2 = layer_matrix(params[conv]), layer_matrix(params[dense])
    P = conv_patches(x, kh, kw)                           # a_t(n), (N, T, kh·kw·c_in)
    T = P.shape[1]
    h1 = _with_ones(P) @ W1.T                             # h_t = W ā_t  (eq. 3.1)
    a1 = np.tanh(h1).reshape(N, T * c_out)                # flatten in (t, channel) order
    h2 = _with_ones(a1) @ W2.T
    f, Dh2 = _loss_and_output_grad(h2, t, loss)
    Da1 = (Dh2 @ W2[:, :-1]).reshape(N, T, c_out)
    Dh1 = Da1 * (1 - np.tanh(h1) ** 2)
    stats = {}
    for name, a, h, g, W in ((conv, P, h1, Dh1, W1), (dense, a1[:, None], h2[:, None], Dh2[:, None], W2)):
        DW = np.einsum("nto,nti->oi", g, _with_ones(a)) / N   # mean_n Σ_t Dh_t ā_tᵀ (Thm. 3 i)
        gk = from_layer_matrix(DW, np.shape(params[name]["kernel"]))
        stats[name] = dict(a=a, h=h, g=g, kernel_grad=gk["kernel"], bias_grad=gk["bias"],
                           T=a.shape[1])
    return stats, float(np.mean(f))


# ----------------------------------------------------------------------------
# Alg. 9: K-BFGS / K-BFGS(L) (Ch. 3), for the tiny CNN
# ----------------------------------------------------------------------------

def cnn_damping(damping, T, conv):
    """Alg. 9 line 2 / §3.4.3: ``(λ_A, λ_G)`` = ``(√|T|·√λ, √λ/√|T|)`` for a conv layer,
    ``(√λ, √λ)`` for a dense layer."""
    if conv:
        return np.sqrt(T) * np.sqrt(damping), np.sqrt(damping) / np.sqrt(T)
    return np.sqrt(damping), np.sqrt(damping)


def alg9_init(params, x_shape, damping, A0=None, conv="Conv_0", dense="Dense_0"):
    """Alg. 9 line 3: ĝ = 0, H_A = (A0 + λ_A I)⁻¹ (A0 warm start or zeros), H_G = λ_G⁻¹ I,
    s_G = y_G = 0. ``x_shape`` is the NHWC input shape (gives ``|T|`` of the conv)."""
    kh, kw = np.shape(params[conv]["kernel"])[:2]
    T_conv = (x_shape[1] - kh + 1) * (x_shape[2] - kw + 1)
    state = {}
    for name, T, is_conv in ((conv, T_conv, True), (dense, 1, False)):
        lam_A, lam_G = cnn_damping(damping, T, is_conv)   # line 2
        W = layer_matrix(params[name])
        d_out, da = W.shape
        A = np.zeros((da, da)) if A0 is None else np.asarray(A0[name], np.float64)
        state[name] = dict(momentum=np.zeros_like(W), H_A=np.linalg.inv(A + lam_A * np.eye(da)),
                           H_G=np.eye(d_out) / lam_G, s_G=np.zeros(d_out), y_G=np.zeros(d_out),
                           pairs=[], lam_A=lam_A, lam_G=lam_G)
    return state


def alg9_step(params, ref_state, k, x, t, lr, damping, loss, beta=0.9, mu1=0.2,
              update_every=1, bfgs="bfgs", memory=100, conv="Conv_0", dense="Dense_0"):
    """Iteration ``k`` (1-based; lines 5-23) of thesis Alg. 9 on the batch ``(x, t)``.

    ``bfgs="lbfgs"``: ``H_G`` = L-BFGS from the newest ``memory`` pairs with
    ``H0 = λ_G⁻¹ I`` (line 9), materialised. ``damping`` is only used through the
    ``λ_A, λ_G`` stored by :func:`alg9_init`. Returns ``(new_params, new_state)``.
    """
    del damping
    layers = (conv, dense)
    stats, _ = cnn_forward_backward(params, x, t, loss, conv, dense)      # line 6
    new_params, state = {}, {}
    for name in layers:                                   # lines 7-11
        st, p_ = ref_state[name], params[name]
        gbar = layer_matrix({"kernel": stats[name]["kernel_grad"], "bias": stats[name]["bias_grad"]})
        mom = beta * st["momentum"] + gbar                # line 8 (no 1 − β)
        p = st["H_G"] @ mom @ st["H_A"]                   # line 9
        W = layer_matrix(p_) - lr * p                     # line 10
        new_params[name] = from_layer_matrix(W, np.shape(p_["kernel"]))
        state[name] = dict(st, momentum=mom)
    if k % update_every != 0:                             # line 12
        return new_params, state
    stats_p, _ = cnn_forward_backward(new_params, x, t, loss, conv, dense)   # line 13
    for name in layers:                                   # lines 14-22
        st, s1, s2 = state[name], stats[name], stats_p[name]
        lam_A, lam_G = st["lam_A"], st["lam_G"]
        abar = _with_ones(s1["a"])                        # ā_t(n), (N, T, da), first pass
        a_hat = abar.mean(axis=(0, 1))                    # â = mean_n mean_t ā_t(n)
        A = np.einsum("nti,ntj->ij", abar, abar) / len(abar)   # A = mean_n Σ_t ā_t ā_tᵀ
        s_A = st["H_A"] @ a_hat                           # line 16
        y_A = A @ s_A + lam_A * s_A
        H_A = bfgs_update(st["H_A"], s_A, y_A)                   # line 17
        # line 19: moving averages of mean_n mean_t of the changes of h_t and Dh_t.
        s_G = beta * st["s_G"] + (1 - beta) * (s2["h"] - s1["h"]).mean(axis=(0, 1))
        y_G = beta * st["y_G"] + (1 - beta) * (s2["g"] - s1["g"]).mean(axis=(0, 1))
        s_t, y_t = dp_dlm(s_G, y_G, st["H_G"], mu1, lam_G)   # line 20
        pairs = list(st["pairs"])
        if bfgs == "bfgs":                                # line 21
            H_G = bfgs_update(st["H_G"], s_t, y_t)
        else:
            if s_t @ y_t > 0:
                pairs = (pairs + [(s_t, y_t)])[-memory:]
            H_G = lbfgs_matrix(pairs, len(s_t), 1.0 / lam_G)
        state[name] = dict(st, H_A=H_A, H_G=H_G, s_G=s_G, y_G=y_G, pairs=pairs)
    return new_params, state


# ----------------------------------------------------------------------------
# K-FAC (Alg. 12 line 19): damped Kronecker solve
# ----------------------------------------------------------------------------

def kfac_direction(A, G, grad_matrix, damping):
    """Solve ``((A + π√λ I) ⊗ (G + √λ/π I)) vec(X) = vec(grad)`` with a materialised ``np.kron``.

    ``π = sqrt((tr A / dim A) / (tr G / dim G))`` (Alg. 12 line 19:
    ``trace(Ω ⊗ I) / trace(I ⊗ Γ)``). ``grad_matrix`` and the result have the layer-matrix
    shape ``(dim G, dim A)``; ``vec`` stacks columns (Fortran order).
    """
    A, G, Xg = (np.asarray(v, np.float64) for v in (A, G, grad_matrix))
    dA, dG = len(A), len(G)
    pi = np.sqrt((np.trace(A) / dA) / (np.trace(G) / dG))
    r = np.sqrt(damping)
    K = np.kron(A + pi * r * np.eye(dA), G + r / pi * np.eye(dG))
    x = np.linalg.solve(K, Xg.reshape(-1, order="F"))
    return x.reshape(dG, dA, order="F")
