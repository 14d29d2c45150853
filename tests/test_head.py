"""The SPLADE head: fused (chunked, custom autograd) vs naive twin, masks, dtypes, validation."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from csplade.model.head.pooling import (
    _MaskedMaxLogits,
    _MaskedSumActivated,
    fused_max_pool,
    fused_sum_pool,
    naive_max_pool,
    naive_sum_pool,
    sparse_pool,
    splade_activation,
)

B, L, H, V = 4, 9, 6, 13
POOLS = {"max": (naive_max_pool, fused_max_pool), "sum": (naive_sum_pool, fused_sum_pool)}


def make_inputs(dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(V, generator=gen).to(dtype).requires_grad_() if bias else None
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    mask[2] = 0  # a row with nothing to pool
    mask[3, :3] = 0  # left padding and a hole (echo-style: only part of the text is pooled)
    mask[3, 6] = 0
    grad_out = torch.rand(B, V, generator=gen) + 0.5  # (B, V), distinct per entry
    return hidden, weight, b, mask, grad_out


def run(fn, hidden, weight, bias, mask, grad_out, **kw):
    """Output and gradients of (hidden, weight, bias) for <grad_out, fn(...)>."""
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    out = fn(hidden, weight, mask, bias, **kw)
    out.backward(grad_out)
    grads = [None if t is None else t.grad for t in (hidden, weight, bias)]
    return out.detach(), grads


def assert_close_all(got, want, atol=1e-5, rtol=1e-5):
    (out_g, grads_g), (out_w, grads_w) = got, want
    torch.testing.assert_close(out_g, out_w, atol=atol, rtol=rtol)
    for name, g, w in zip(("hidden", "weight", "bias"), grads_g, grads_w, strict=True):
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(
                g, w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
            )


@pytest.mark.parametrize("pooling", ["max", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 2, 5, None, V, V + 7])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_naive(pooling, chunk_size, bias):
    hidden, weight, b, mask, grad_out = make_inputs(bias=bias)
    naive, fused = POOLS[pooling]
    want = run(naive, hidden, weight, b, mask, grad_out)
    got = run(fused, hidden, weight, b, mask, grad_out, chunk_size=chunk_size)
    assert got[0].dtype == torch.float32 and got[0].shape == (B, V)
    assert (got[0] > 0).any() and (got[1][0].abs() > 0).any()  # the comparison is not vacuous
    assert_close_all(got, want)


@pytest.mark.parametrize("pooling", ["max", "sum"])
def test_softcap_matches_naive(pooling):
    hidden, weight, b, mask, grad_out = make_inputs()
    with torch.no_grad():
        hidden *= 3  # logits of several units: the cap changes values
    naive, fused = POOLS[pooling]
    want = run(naive, hidden, weight, b, mask, grad_out, softcap=4.0)
    got = run(fused, hidden, weight, b, mask, grad_out, softcap=4.0, chunk_size=4)
    assert_close_all(got, want)
    uncapped = fused(hidden, weight, mask, b, chunk_size=4).detach()
    assert not torch.allclose(got[0], uncapped)
    if pooling == "max":
        assert got[0].max() <= torch.log1p(torch.tensor(4.0)) + 1e-6


@pytest.mark.parametrize("pooling", ["max", "sum"])
@pytest.mark.parametrize("fused", [True, False])
def test_padding_never_wins(pooling, fused):
    hidden, weight, b, mask, grad_out = make_inputs()
    clean = hidden.detach().masked_fill(~mask.bool().unsqueeze(-1), 0.0).requires_grad_()
    loud = hidden.detach().masked_fill(~mask.bool().unsqueeze(-1), 1e4).requires_grad_()
    kw = {"pooling": pooling, "fused": fused, "chunk_size": 3 if fused else None}
    fn = sparse_pool
    out_clean, grads_clean = run(fn, clean, weight, b, mask, grad_out, **kw)
    out_loud, grads_loud = run(fn, loud, weight, b, mask, grad_out, **kw)
    torch.testing.assert_close(out_loud, out_clean)
    torch.testing.assert_close(grads_loud[0], grads_clean[0])
    torch.testing.assert_close(grads_loud[1], grads_clean[1])
    assert (grads_loud[0][~mask.bool()] == 0).all()  # padded positions get no gradient


@pytest.mark.parametrize("pooling", ["max", "sum"])
@pytest.mark.parametrize("junk", [float("nan"), float("inf"), -float("inf")])
def test_fused_ignores_non_finite_padding(pooling, junk):
    # e.g. NaN hidden states at padded positions from a fully masked attention row
    hidden, weight, b, mask, grad_out = make_inputs()
    padded = ~mask.bool().unsqueeze(-1)
    clean = hidden.detach().masked_fill(padded, 0.0).requires_grad_()
    dirty = hidden.detach().masked_fill(padded, junk).requires_grad_()
    fused = POOLS[pooling][1]
    want = run(fused, clean, weight, b, mask, grad_out, chunk_size=4)
    got = run(fused, dirty, weight, b, mask, grad_out, chunk_size=4)
    assert torch.isfinite(got[0]).all() and all(torch.isfinite(g).all() for g in got[1])
    assert_close_all(got, want)


@pytest.mark.parametrize("pooling", ["max", "sum"])
def test_all_padding_rows_give_zeros_and_finite_grads(pooling):
    hidden, weight, b, mask, grad_out = make_inputs()
    mask = torch.zeros_like(mask)
    mask[0, 2] = 1  # one pooled position in the whole batch
    out, (g_hidden, g_weight, g_bias) = run(
        POOLS[pooling][1], hidden, weight, b, mask, grad_out, chunk_size=4
    )
    assert torch.equal(out[1:], torch.zeros(B - 1, V))
    for g in (g_hidden, g_weight, g_bias):
        assert torch.isfinite(g).all()
    assert (g_hidden[1:] == 0).all() and (g_hidden[0, [0, 1, 3]] == 0).all()
    # nothing pooled at all: zeros and zero gradients, no NaN / -inf
    out, grads = run(POOLS[pooling][1], hidden, weight, b, torch.zeros_like(mask), grad_out)
    assert torch.equal(out, torch.zeros(B, V))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_int_and_bool_masks_agree():
    hidden, weight, b, mask, _ = make_inputs()
    torch.testing.assert_close(
        fused_max_pool(hidden, weight, mask, b), fused_max_pool(hidden, weight, mask.bool(), b)
    )


@pytest.mark.parametrize("pooling", ["max", "sum"])
def test_frozen_weight_gets_no_grad(pooling):
    hidden, weight, b, mask, grad_out = make_inputs()
    want = run(POOLS[pooling][0], hidden, weight, b, mask, grad_out)
    frozen = weight.detach()  # requires_grad False, the LoRA case
    out, (g_hidden, g_weight, g_bias) = run(
        POOLS[pooling][1], hidden, frozen, b, mask, grad_out, chunk_size=4
    )
    assert g_weight is None and frozen.grad is None
    torch.testing.assert_close(out, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_hidden, want[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_bias, want[1][2], atol=1e-5, rtol=1e-5)


def test_max_tie_sends_whole_gradient_to_first_position():
    # Integer-valued inputs make every dot product exact, so identical positions tie bit for bit.
    gen = torch.Generator().manual_seed(2)
    row = torch.randint(-2, 3, (1, 1, H), generator=gen).float()
    hidden = row.expand(1, L, H).clone().requires_grad_()  # every position identical
    weight = torch.randint(-2, 3, (V, H), generator=gen).float()
    mask = torch.ones(1, L)
    mask[0, 0] = 0  # position 1 is the first pooled one
    out, (grad_fused, _, _) = run(fused_max_pool, hidden, weight, None, mask, torch.ones(1, V))
    out_naive, (grad_naive, _, _) = run(
        naive_max_pool, hidden, weight, None, mask, torch.ones(1, V)
    )
    torch.testing.assert_close(out, out_naive)
    assert grad_fused[0, 1].abs().sum() > 0
    assert torch.equal(grad_fused[0, 2:], torch.zeros(L - 2, H))
    assert (grad_naive[0, 2:].abs().sum(-1) > 0).all()  # autograd of amax splits the tie
    # the total gradient reaching the sequence is the same either way
    torch.testing.assert_close(grad_fused.sum(1), grad_naive.sum(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pooling", ["max", "sum"])
def test_low_precision_close_to_fp32(dtype, pooling):
    hidden, weight, b, mask, grad_out = make_inputs(dtype=dtype)
    ref_inputs = [t.detach().float().requires_grad_() for t in (hidden, weight, b)]
    want = run(POOLS[pooling][0], *ref_inputs, mask, grad_out)
    for fn in POOLS[pooling]:
        kw = {"chunk_size": 4} if fn is POOLS[pooling][1] else {}
        out, grads = run(fn, hidden, weight, b, mask, grad_out, **kw)
        assert out.dtype == torch.float32
        assert [g.dtype for g in grads] == [dtype] * 3
        torch.testing.assert_close(out, want[0], atol=0.05, rtol=0.02)
        g_hidden, g_weight, g_bias = (g.float() for g in grads)
        w_hidden, w_weight, w_bias = want[1]
        torch.testing.assert_close(g_bias, w_bias, atol=0.05, rtol=0.02)
        if pooling == "sum":
            torch.testing.assert_close(g_hidden, w_hidden, atol=0.1, rtol=0.05)
            torch.testing.assert_close(g_weight, w_weight, atol=0.1, rtol=0.05)
        else:
            # Rounding the logits creates or flips near-ties, moving the max's gradient to another
            # position; what reaches each sequence as a whole does not depend on which one won.
            torch.testing.assert_close(g_hidden.sum(1), w_hidden.sum(1), atol=0.1, rtol=0.05)
            assert torch.isfinite(g_weight).all()


def test_mixed_dtypes_and_autocast():
    hidden, weight, b, mask, grad_out = make_inputs()
    want = run(naive_max_pool, hidden, weight, b, mask, grad_out)
    low = hidden.detach().bfloat16().requires_grad_()  # bf16 activations, fp32 LM head
    out, grads = run(fused_max_pool, low, weight, b, mask, grad_out, chunk_size=4)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    torch.testing.assert_close(out, want[0], atol=0.05, rtol=0.02)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_fused, grads_fused = run(fused_sum_pool, hidden, weight, b, mask, grad_out)
        out_naive, _ = run(naive_sum_pool, hidden, weight, b, mask, grad_out)
    assert [g.dtype for g in grads_fused] == [torch.float32] * 3
    torch.testing.assert_close(out_fused, out_naive, atol=0.1, rtol=0.02)


class _TensorSizes(TorchDispatchMode):
    """Records the element count of every tensor any aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("pooling", ["max", "sum"])
def test_fused_never_builds_batch_length_vocab(pooling):
    batch, length, width, vocab = 3, 32, 8, 256
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch, length, width, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen, requires_grad=True)
    mask = torch.ones(batch, length)
    sizes = {}
    for fused in (False, True):
        with _TensorSizes() as rec:
            sparse_pool(
                hidden, weight, mask, pooling=pooling, fused=fused, chunk_size=16
            ).sum().backward()
        sizes[fused] = rec.largest
    assert sizes[False] >= batch * length * vocab  # the naive twin does build it
    # fused: largest is a (B, L, C) chunk, a (B, C, H) chunk or the (V, H) weight gradient
    assert sizes[True] <= max(batch * length * 16, batch * 16 * width, vocab * width, batch * vocab)


def test_gradcheck_fused_functions_float64():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]], dtype=torch.bool)
    f64 = torch.float64
    assert torch.autograd.gradcheck(
        lambda h, w, b: _MaskedMaxLogits.apply(h, w, b, mask, 2, f64), (hidden, weight, bias)
    )
    assert torch.autograd.gradcheck(
        lambda h, w, b: _MaskedSumActivated.apply(h, w, b, mask, 2, f64, 1.5),
        (hidden, weight, bias),
    )
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_max_pool(h, w, mask, b, softcap=2.0, chunk_size=3),
        (hidden, weight, bias),
    )


def test_splade_activation():
    x = torch.tensor([-2.0, 0.0, 1.0, 3.0])
    torch.testing.assert_close(splade_activation(x), torch.tensor([0.0, 0.0, 0.6931472, 1.3862944]))


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"pooling": "mean"}, ["'mean'", "max", "sum"]),
        ({"weight": torch.zeros(V, H + 1)}, [f"({V}, {H + 1})", f"({B}, {L}, {H})"]),
        ({"mask": torch.ones(B, L + 2)}, [f"({B}, {L + 2})", f"({B}, {L}, {H})"]),
        ({"bias": torch.zeros(V - 1)}, [f"({V - 1},)", f"({V}, {H})"]),
        ({"hidden": torch.zeros(B * L, H)}, [f"({B * L}, {H})", "(B, L, H)"]),
        ({"chunk_size": 0}, ["chunk_size", "0"]),
        ({"softcap": -1.0}, ["softcap", "-1.0"]),
        ({"mask": torch.full((B, L), 2)}, ["0/1", "value 2", "(0, 0)"]),
    ],
)
@pytest.mark.parametrize("fused", [True, False])
def test_bad_input_raises(change, fragments, fused):
    hidden, weight, b, mask, _ = make_inputs()
    kwargs = {"hidden": hidden, "weight": weight, "mask": mask, "bias": b, "fused": fused}
    kwargs.update(change)
    with pytest.raises(ValueError) as info:
        sparse_pool(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)
