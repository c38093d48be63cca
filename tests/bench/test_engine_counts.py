"""``qnopt.bench.engine``: the program counts it reports are read from the compiled step."""

import optax

import qnopt
from qnopt.bench.engine import MLP, measure, program_counts


def test_program_counts_read_instructions():
    text = ("%fusion.1 = f32[2]{0} fusion(f32[2]{0} %x), kind=kLoop\n"
            "%cc = (f32[3,3]{1,0}, s32[]) custom-call(f32[3,3]{1,0} %a), custom_call_target=\"lapack\"\n"
            "%w = (s32[]) while((s32[]) %t), condition=%c, body=%b\n"
            "%fused_computation { %fusion_param = f32[2] parameter(0) }\n")
    assert program_counts(text) == {"fusions": 1, "custom_calls": 1, "while_loops": 1}


def test_kfac_kernels_do_not_grow_with_depth():
    """The figure issue 17 tracks: K-FAC's compiled step on 1- and 3-layer MLPs. The hidden
    layers share one stack, so the damped eigendecompositions are one batched call per factor
    shape (2 stacks x 2 factors) at any depth, and the fusions K-FAC adds to Adam's step (same
    model, same capture) barely grow (before the stacks: 2 decompositions per layer, and the
    extra fusions grew with every layer)."""
    kfac = lambda: qnopt.kfac(0.01, damping=0.1, inverse_every=1)
    one, three = (measure(kfac, d, 4, batch=8, steps=2) for d in (1, 3))
    adam1, adam3 = (measure(lambda: optax.adam(1e-3), d, 4, batch=8, steps=2) for d in (1, 3))
    assert one["custom_calls"] == three["custom_calls"] == 2 * 2 and adam3["custom_calls"] == 0
    extra1, extra3 = one["fusions"] - adam1["fusions"], three["fusions"] - adam3["fusions"]
    assert 0 < extra3 < 1.25 * extra1, (extra1, extra3)
    assert MLP(3, 4).depth == 3


def test_tensor_engine_decompositions_do_not_grow_with_depth():
    """TNT on 1- and 3-layer MLPs: the parameters with equal views (the hidden kernels, their
    biases) are refreshed as one stack, so the compiled step holds as many decompositions at any
    depth (before: a Cholesky and its solves per mode of every parameter — 585 custom calls on a
    64-layer MLP, now 18)."""
    tnt = lambda: qnopt.tnt(1e-3, damping=0.1, inverse_every=1)
    one, three = (measure(tnt, d, 4, batch=8, steps=2) for d in (1, 3))
    assert one["custom_calls"] == three["custom_calls"] > 0
