"""csplade.training.losses under torch.distributed: 2 gloo processes vs one process on the full batch.

Each worker holds part of a fixed random batch, encodes it with the same tiny linear "encoder"
(``relu(Linear(x))``, so there is a parameter gradient), computes the loss, calls backward and then
averages the parameter gradients over ranks, which is what DDP does. The averaged gradients (and the
rank-averaged loss) must match one process computing the corresponding loss on the full batch.
All scenarios run in one spawn (a few seconds); the test functions compare the saved results.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from csplade.training import losses

pytestmark = pytest.mark.distributed

WORLD = 2
N_QUERIES, GROUP, DIM, VOCAB = 4, 3, 8, 16
TEMPERATURE, LAM_Q, LAM_D, LAM_L1 = 0.5, 0.3, 0.7, 0.05
SPLITS = {"even": (2, 2), "uneven": (3, 1)}  # queries per rank


def _setup():
    """Identical encoder, batch and IDF in every process."""
    torch.manual_seed(0)
    encoder = nn.Linear(DIM, VOCAB)
    g = torch.Generator().manual_seed(1)
    x_q = torch.randn(N_QUERIES, DIM, generator=g)
    x_d = torch.randn(N_QUERIES * GROUP, DIM, generator=g)
    idf = torch.rand(VOCAB, generator=g) * 3 + 0.5
    return encoder, x_q, x_d, idf


def _encode(encoder, x):
    return torch.relu(encoder(x))


def _grads(encoder):
    return [p.grad.detach().clone() for p in encoder.parameters()]


def _shard(x_q, x_d, split, rank):
    start = sum(split[:rank])
    stop = start + split[rank]
    return x_q[start:stop], x_d[start * GROUP : stop * GROUP]


# --- the losses under test (same code on a rank and, for the regularizers, in the reference) ----


def _loss_cross(q, d, idf):
    return (
        losses.contrastive_loss(q, d, GROUP, TEMPERATURE, cross_device=True)
        + LAM_Q * losses.regularize(q, "flops")
        + LAM_D * losses.regularize(d, "flops")
    )


def _loss_local(q, d, idf):
    contrastive = losses.contrastive_loss(q, d, GROUP, TEMPERATURE, cross_device=False)
    return contrastive + LAM_D * losses.regularize(d, "flops")


def _loss_regs(q, d, idf, distributed=True):
    return (
        LAM_D * losses.regularize(d, "flops", distributed=distributed)
        + LAM_L1 * losses.regularize(d, "l1", distributed=distributed)
        + LAM_Q * losses.regularize(q, "idf_flops", idf=idf, distributed=distributed)
    )


def _run_rank(loss_fn, split, rank, **kwargs):
    """Loss on this rank's shard, backward, DDP-style gradient average; returns (mean loss, grads)."""
    encoder, x_q, x_d, idf = _setup()
    xq, xd = _shard(x_q, x_d, split, rank)
    loss = loss_fn(_encode(encoder, xq), _encode(encoder, xd), idf, **kwargs)
    loss.backward()
    grads = _grads(encoder)
    for grad in grads:
        dist.all_reduce(grad)
        grad /= WORLD
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    return (mean_loss / WORLD).item(), grads


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        assert dist.get_world_size() == WORLD
        results = {}
        for split_name, split in SPLITS.items():
            results[("cross", split_name)] = _run_rank(_loss_cross, split, rank)
            results[("regs", split_name)] = _run_rank(_loss_regs, split, rank)
            # the peer bug, kept as a control: regularizers on the local rows only
            results[("regs_local_only", split_name)] = _run_rank(
                _loss_regs, split, rank, distributed=False
            )
        results[("local", "even")] = _run_rank(_loss_local, SPLITS["even"], rank)
        # the gathered tensor itself, uneven rows: rank order, nothing lost
        marker = torch.full((SPLITS["uneven"][rank], 2), float(rank))
        results["gathered"] = losses.all_gather_with_grad(marker)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _reference(loss_fn):
    """One process, full batch: (loss, grads)."""
    encoder, x_q, x_d, idf = _setup()
    loss = loss_fn(encoder, x_q, x_d, idf)
    loss.backward()
    return loss.item(), _grads(encoder)


def _assert_matches(got, expected):
    got_loss, got_grads = got
    ref_loss, ref_grads = expected
    assert got_loss == pytest.approx(ref_loss, abs=1e-5)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def _full_regs(encoder, x_q, x_d, idf):
    return _loss_regs(_encode(encoder, x_q), _encode(encoder, x_d), idf)


def test_ranks_agree(rank_results):
    r0, r1 = rank_results
    for key in r0:
        if key == "gathered":
            continue
        assert r0[key][0] == pytest.approx(r1[key][0])
        for a, b in zip(r0[key][1], r1[key][1], strict=True):
            torch.testing.assert_close(a, b)


def test_cross_device_even_split_equals_full_batch(rank_results):
    def full(encoder, x_q, x_d, idf):
        return _loss_cross(_encode(encoder, x_q), _encode(encoder, x_d), idf)

    _assert_matches(rank_results[0][("cross", "even")], _reference(full))


def test_cross_device_uneven_split_is_mean_of_rank_means(rank_results):
    # With 3 + 1 queries, DDP's objective is the mean of the two ranks' means (as for any loss),
    # computed with every document of the batch as a candidate: checks the label offsets.
    split = SPLITS["uneven"]

    def full(encoder, x_q, x_d, idf):
        q, d = _encode(encoder, x_q), _encode(encoder, x_d)
        scores = q @ d.T / TEMPERATURE  # (4, 12)
        labels = torch.arange(N_QUERIES) * GROUP
        per_query = nn.functional.cross_entropy(scores, labels, reduction="none")
        rank_means = [per_query[:3].mean(), per_query[3:].mean()]
        assert split == (3, 1)
        return sum(rank_means) / WORLD + LAM_Q * losses.flops(q) + LAM_D * losses.flops(d)

    _assert_matches(rank_results[0][("cross", "uneven")], _reference(full))


def test_no_cross_device_negatives_equals_per_half_in_batch(rank_results):
    def full(encoder, x_q, x_d, idf):
        q, d = _encode(encoder, x_q), _encode(encoder, x_d)
        halves = [
            losses.contrastive_loss(q[:2], d[: 2 * GROUP], GROUP, TEMPERATURE),
            losses.contrastive_loss(q[2:], d[2 * GROUP :], GROUP, TEMPERATURE),
        ]
        return sum(halves) / WORLD + LAM_D * losses.flops(d)

    _assert_matches(rank_results[0][("local", "even")], _reference(full))


@pytest.mark.parametrize("split_name", sorted(SPLITS))
def test_regularizers_do_not_depend_on_the_split(rank_results, split_name):
    _assert_matches(rank_results[0][("regs", split_name)], _reference(_full_regs))


@pytest.mark.parametrize("split_name", sorted(SPLITS))
def test_local_only_regularizers_do_not_match(rank_results, split_name):
    # Control: without the global batch the gradients differ, so the test above can fail.
    _, ref_grads = _reference(_full_regs)
    _, got_grads = rank_results[0][("regs_local_only", split_name)]
    assert not torch.allclose(got_grads[0], ref_grads[0], rtol=1e-3, atol=1e-4)


def test_gather_keeps_rank_order_with_uneven_rows(rank_results):
    expected = torch.tensor([[0.0, 0.0]] * SPLITS["uneven"][0] + [[1.0, 1.0]] * SPLITS["uneven"][1])
    for results in rank_results:
        torch.testing.assert_close(results["gathered"], expected)
