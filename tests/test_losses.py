"""csplade.training.losses on tiny tensors: every expected value is worked out here by plain arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from csplade.training import losses


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _neg_log_softmax(scores: list[float], label: int) -> float:
    return -scores[label] + math.log(sum(math.exp(s) for s in scores))


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# Two queries, group size 2: rows 0,1 are query 0's positive and negative, rows 2,3 query 1's.
Q = [[1.0, 0.0], [0.0, 2.0]]
D = [[1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]


# --- contrastive --------------------------------------------------------------------------------


def test_contrastive_own_group_only_hand_value():
    # query 0: scores (1, 0), positive first; query 1: scores (2, 0).
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 2
    got = losses.contrastive_loss(_t(Q), _t(D), group_size=2, in_batch_negatives=False)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_in_batch_hand_value():
    # query 0 against all four docs: (1, 0, 0, 1), label 0; query 1: (2, 2, 2, 0), label 2.
    l0 = -1 + math.log(2 * math.e + 2)
    l1 = -2 + math.log(3 * math.exp(2) + 1)
    got = losses.contrastive_loss(_t(Q), _t(D), group_size=2)
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_contrastive_temperature_divides_scores():
    # temperature 0.5 doubles every score: query 0 (2, 0), query 1 (4, 0).
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-4))) / 2
    got = losses.contrastive_loss(
        _t(Q), _t(D), group_size=2, temperature=0.5, in_batch_negatives=False
    )
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_without_in_batch_equals_per_group_cross_entropy():
    g = torch.Generator().manual_seed(0)
    n_queries, group_size, vocab, temperature = 3, 4, 7, 0.7
    q = torch.rand(n_queries, vocab, generator=g, dtype=torch.float64)
    d = torch.rand(n_queries * group_size, vocab, generator=g, dtype=torch.float64)
    per_query = []
    for i in range(n_queries):
        scores = [
            _dot(q[i].tolist(), d[i * group_size + k].tolist()) / temperature
            for k in range(group_size)
        ]
        per_query.append(_neg_log_softmax(scores, 0))
    got = losses.contrastive_loss(
        q, d, group_size, temperature=temperature, in_batch_negatives=False
    )
    assert got.item() == pytest.approx(sum(per_query) / n_queries, rel=1e-6)


def test_contrastive_in_batch_loops_and_gradient():
    g = torch.Generator().manual_seed(1)
    n_queries, group_size, vocab, temperature = 3, 2, 5, 2.0
    q = torch.rand(n_queries, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    d = torch.rand(n_queries * group_size, vocab, generator=g, dtype=torch.float64)
    rows = d.tolist()
    total = 0.0
    grad_q = []
    for i in range(n_queries):
        scores = [_dot(q[i].tolist(), row) / temperature for row in rows]
        label = i * group_size
        total += _neg_log_softmax(scores, label)
        z = sum(math.exp(s) for s in scores)
        probs = [math.exp(s) / z for s in scores]
        # d loss_i / d q_i = sum_k (p_k - [k == label]) d_k / temperature, then / n_queries (mean)
        grad_q.append(
            [
                sum((probs[k] - (k == label)) * rows[k][v] for k in range(len(rows)))
                / temperature
                / n_queries
                for v in range(vocab)
            ]
        )
    loss = losses.contrastive_loss(q, d, group_size, temperature=temperature)
    loss.backward()
    assert loss.item() == pytest.approx(total / n_queries, rel=1e-6)
    torch.testing.assert_close(q.grad, _t(grad_q))


def test_contrastive_cross_device_without_process_group_is_local():
    g = torch.Generator().manual_seed(2)
    q = torch.rand(2, 6, generator=g)
    d = torch.rand(6, 6, generator=g)
    local = losses.contrastive_loss(q, d, 3)
    crossed = losses.contrastive_loss(q, d, 3, cross_device=True)
    assert crossed.item() == pytest.approx(local.item())


def test_contrastive_is_float32_for_bfloat16_inputs():
    q = _t(Q).bfloat16()
    d = _t(D).bfloat16()
    assert losses.contrastive_loss(q, d, 2).dtype == torch.float32


def test_group_scores_hand_values():
    torch.testing.assert_close(
        losses.group_scores(_t(Q), _t(D), 2), torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    )


# --- distillation -------------------------------------------------------------------------------


def test_margin_mse_hand_value():
    student = _t([[3.0, 1.0, 2.0], [0.0, 0.0, 1.0]])
    teacher = _t([[5.0, 1.0, 5.0], [2.0, 1.0, 2.0]])
    # margins: student (2, 1), (0, -1); teacher (4, 0), (1, 0); squared errors 4, 1, 1, 1.
    got = losses.margin_mse_loss(student, teacher)
    assert got.item() == pytest.approx((4 + 1 + 1 + 1) / 4)


def test_margin_mse_does_not_backprop_into_teacher():
    student = _t([[3.0, 1.0]]).requires_grad_()
    teacher = _t([[5.0, 1.0]]).requires_grad_()
    losses.margin_mse_loss(student, teacher).backward()
    assert teacher.grad is None
    # d/ds_pos (m_s - m_t)^2 = 2 (2 - 4) = -4, d/ds_neg = +4
    torch.testing.assert_close(student.grad, _t([[-4.0, 4.0]]))


def test_kl_distill_hand_value_and_temperature():
    p_t = [0.25, 0.75]
    kl_row = sum(p * math.log(p / 0.5) for p in p_t)  # student uniform
    student = _t([[0.0, 0.0], [1.0, 1.0]])
    teacher = _t([[0.0, math.log(3.0)], [5.0, 5.0 + math.log(3.0)]])
    got = losses.kl_distill_loss(student, teacher)
    assert got.item() == pytest.approx(kl_row, rel=1e-6)  # batchmean: (kl_row + kl_row) / 2
    # temperature 2 on teacher scores twice as far apart gives the same distributions
    got_t = losses.kl_distill_loss(student, teacher * 2, temperature=2.0)
    assert got_t.item() == pytest.approx(kl_row, rel=1e-6)
    assert losses.kl_distill_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


# --- regularizers -------------------------------------------------------------------------------

REPS = [[1.0, 0.0, 2.0], [-3.0, 0.0, 0.0]]  # column means of |w|: (2, 0, 1)


def test_flops_value_and_gradient():
    reps = _t(REPS).requires_grad_()
    value = losses.flops(reps)
    value.backward()
    assert value.item() == pytest.approx(2.0**2 + 0.0 + 1.0**2)
    # d/dw_ij = 2 * mean_j * sign(w_ij) / N, N = 2; sign(0) = 0
    torch.testing.assert_close(reps.grad, _t([[2.0, 0.0, 1.0], [-2.0, 0.0, 0.0]]))


def test_l1_value_and_gradient():
    reps = _t(REPS).requires_grad_()
    value = losses.l1(reps)
    value.backward()
    assert value.item() == pytest.approx((1 + 0 + 2 + 3 + 0 + 0) / 2)
    torch.testing.assert_close(reps.grad, _t([[0.5, 0.0, 0.5], [-0.5, 0.0, 0.0]]))


def test_idf_flops_value_and_gradient():
    reps = _t(REPS).requires_grad_()
    idf = _t([2.0, 1.0, 4.0])
    value = losses.idf_flops(reps, idf)
    value.backward()
    assert value.item() == pytest.approx((2 / 2) ** 2 + 0 + (1 / 4) ** 2)
    # d/dw_ij = 2 * mean_j / idf_j^2 * sign(w_ij) / N
    g0, g2 = 2 * 2 / 4 / 2, 2 * 1 / 16 / 2
    torch.testing.assert_close(reps.grad, _t([[g0, 0.0, g2], [-g0, 0.0, 0.0]]))


def test_idf_flops_penalises_frequent_tokens_more():
    reps = _t([[1.0, 1.0]])
    value = losses.idf_flops(reps, _t([0.5, 5.0]))
    assert value.item() == pytest.approx(4.0 + 0.04)


def test_idf_flops_rejects_bad_idf():
    with pytest.raises(ValueError, match=r"first at index 1: 0\.0"):
        losses.idf_flops(_t(REPS), _t([1.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match=r"idf must have shape \(V,\) = \(3,\)"):
        losses.idf_flops(_t(REPS), _t([1.0, 2.0]))


def test_regularize_single_process_is_the_plain_function():
    reps = _t(REPS)
    idf = _t([2.0, 1.0, 4.0])
    assert losses.regularize(reps, "flops").item() == pytest.approx(5.0)
    assert losses.regularize(reps, "l1").item() == pytest.approx(3.0)
    assert losses.regularize(reps, "idf_flops", idf=idf).item() == pytest.approx(1.0625)


def test_regularize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown regularizer kind 'flop'"):
        losses.regularize(_t(REPS), "flop")
    with pytest.raises(ValueError, match="needs idf"):
        losses.regularize(_t(REPS), "idf_flops")
    with pytest.raises(ValueError, match="only used by kind='idf_flops'"):
        losses.regularize(_t(REPS), "flops", idf=_t([1.0, 1.0, 1.0]))


def test_all_gather_without_process_group_is_identity():
    t = torch.rand(3, 2)
    assert losses.all_gather_with_grad(t) is t


# --- weights ------------------------------------------------------------------------------------


def test_quadratic_warmup_values():
    w, lam = 10, 0.3
    assert losses.quadratic_warmup(0, w, lam) == 0.0
    assert losses.quadratic_warmup(w // 2, w, lam) == pytest.approx(lam * 0.25)
    assert losses.quadratic_warmup(w, w, lam) == pytest.approx(lam)
    assert losses.quadratic_warmup(2 * w, w, lam) == pytest.approx(lam)
    assert losses.quadratic_warmup(0, 0, lam) == pytest.approx(lam)
    with pytest.raises(ValueError, match="step must be >= 0"):
        losses.quadratic_warmup(-1, w, lam)


def test_reg_weight_scheduler():
    sched = losses.RegWeightScheduler(lambda_q=0.1, lambda_d=0.4, warmup_steps=4)
    assert sched.weights(0) == (0.0, 0.0)
    lam_q, lam_d = sched.weights(2)
    assert (lam_q, lam_d) == (pytest.approx(0.025), pytest.approx(0.1))
    assert sched.weights(100) == (pytest.approx(0.1), pytest.approx(0.4))
    with pytest.raises(ValueError, match="lambda_d must be a finite number >= 0"):
        losses.RegWeightScheduler(lambda_q=0.1, lambda_d=-1.0)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        losses.RegWeightScheduler(lambda_q=0.1, lambda_d=0.1, warmup_steps=-5)


def test_combine_sums_weighted_parts_and_logs_them_detached():
    a = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(3.0, requires_grad=True)
    total, logged = losses.combine({"rank": a, "flops_d": b}, {"rank": 1.0, "flops_d": 0.5})
    assert total.item() == pytest.approx(2.0 + 1.5)
    total.backward()
    assert (a.grad.item(), b.grad.item()) == (1.0, 0.5)
    assert set(logged) == {"rank", "flops_d"}
    assert logged["flops_d"].item() == 3.0 and not logged["flops_d"].requires_grad


def test_combine_rejects_unmatched_names_and_non_scalars():
    with pytest.raises(ValueError, match=r"parts without a weight \['flops_q'\]"):
        losses.combine({"rank": torch.tensor(1.0), "flops_q": torch.tensor(1.0)}, {"rank": 1.0})
    with pytest.raises(ValueError, match=r"weights without a part \['kl'\]"):
        losses.combine({"rank": torch.tensor(1.0)}, {"rank": 1.0, "kl": 1.0})
    with pytest.raises(ValueError, match=r"'rank' must be a scalar tensor, got \(2,\)"):
        losses.combine({"rank": torch.ones(2)}, {"rank": 1.0})


# --- input validation ---------------------------------------------------------------------------


def test_contrastive_validation_messages():
    q = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"d_reps has 7 rows, not a multiple of group_size=3"):
        losses.contrastive_loss(q, torch.zeros(7, 5), 3)
    with pytest.raises(
        ValueError, match=r"d_reps holds 3 groups of 2 but q_reps has 2 queries .*\(6, 5\)"
    ):
        losses.contrastive_loss(q, torch.zeros(6, 5), 2)
    with pytest.raises(
        ValueError, match=r"different vocabulary sizes .*q_reps \(2, 5\), d_reps \(4, 6\)"
    ):
        losses.contrastive_loss(q, torch.zeros(4, 6), 2)
    with pytest.raises(ValueError, match=r"q_reps must be 2-D, got shape \(5,\)"):
        losses.contrastive_loss(torch.zeros(5), torch.zeros(4, 5), 2)
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        losses.contrastive_loss(q, torch.zeros(4, 5), 0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        losses.contrastive_loss(q, torch.zeros(4, 5), 2, temperature=0.0)
    with pytest.raises(ValueError, match="needs in_batch_negatives=True"):
        losses.contrastive_loss(
            q, torch.zeros(4, 5), 2, in_batch_negatives=False, cross_device=True
        )


def test_distillation_validation_messages():
    with pytest.raises(ValueError, match=r"\(2, 3\) and teacher_scores \(2, 4\)"):
        losses.margin_mse_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least 2 columns"):
        losses.margin_mse_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"reps has no rows"):
        losses.flops(torch.zeros(0, 4))
