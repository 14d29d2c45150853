"""Where the head's weight comes from, in one process: which head runs, the loud fallback, the guards
that turn a released (sharded) weight into an error instead of a wrong or zero result, and the
(B, L, V) probe the distributed tests rely on. The sharded runs themselves: tests/test_zero3.py,
tests/test_fsdp.py."""

from __future__ import annotations

import logging

import pytest
import torch
from probed_cli import NoVocabTensors
from torch import nn

from csplade.model.head import fused_max_pool, fused_sum_pool, splade, weights
from csplade.model.head.weights import head_parameters, head_params

TEXTS = ["aa ab ac ad", "ba bb", "ca cb cc"]


def _batch(encoder):
    batch = encoder.tokenize(TEXTS)
    batch.pop("n_truncated")
    return batch


def test_every_head_call_goes_through_the_head_module(tiny_encoder_factory):
    encoder = tiny_encoder_factory(head_chunk_size=64)
    seen = []
    encoder.head_call.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    reps = encoder(**_batch(encoder))
    assert seen == [reps.shape] and encoder.head_calls == {"fused": 1}
    assert not any(k.startswith("head_call") for k in encoder.state_dict())  # holds no weights


def test_the_fused_head_builds_no_vocabulary_by_length_tensor(tiny_encoder_factory):
    """The probe of the distributed tests passes the fused head, forward and backward, and fails the
    naive one (which builds the (B, L, V) logits)."""
    fused = tiny_encoder_factory(head_chunk_size=64).train()
    with NoVocabTensors(fused.vocab_size):
        fused(**_batch(fused)).sum().backward()
    naive = tiny_encoder_factory(fused_head=False).train()
    with pytest.raises(AssertionError, match=r"\(3, \d+, 256\)"), NoVocabTensors(256):
        naive(**_batch(naive))


class _OpaqueHead(nn.Module):
    """An LM head with no plain weight to read (as a quantized head looks to the fused head)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.inner = linear

    def forward(self, hidden):
        return self.inner(hidden)


def test_the_module_fallback_warns_once_with_its_reason(tiny_encoder_factory, caplog):
    encoder = tiny_encoder_factory().train()
    want = encoder(**_batch(encoder)).detach()
    encoder.base_model.lm_head = _OpaqueHead(encoder.base_model.lm_head)
    splade._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="csplade.model.head.splade"):
        got = encoder(**_batch(encoder))
        encoder(**_batch(encoder))
    warnings = [r.getMessage() for r in caplog.records if "(B, L, V)" in r.getMessage()]
    assert len(warnings) == 1 and "(_OpaqueHead)" in warnings[0]
    assert encoder.head_calls["module"] == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # same vectors, naive path


def _partitioned(shape: tuple[int, ...]) -> nn.Parameter:
    """A parameter as ZeRO-3 leaves it outside its gather: empty data, the full shape in ds_shape."""
    param = nn.Parameter(torch.empty(0))
    param.ds_id, param.ds_shape = 0, torch.Size(shape)
    return param


def test_a_partitioned_head_is_found_but_never_read_ungathered():
    head = nn.Linear(8, 16, bias=False)
    head.weight = _partitioned((16, 8))
    assert head_parameters(head) == [head.weight]  # by its full shape: the fused head applies
    with pytest.raises(RuntimeError, match="partitioned by DeepSpeed ZeRO-3 and not gathered"):
        head_params(head)
    assert weights.vocab_size(_WithHead(head)) == 16


class _WithHead(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def get_output_embeddings(self):
        return self.head


def test_a_lora_head_lists_its_factors_and_folds_them(tiny_encoder_factory):
    from peft import LoraConfig, get_peft_model

    encoder = tiny_encoder_factory()
    encoder.backbone = get_peft_model(
        encoder.backbone, LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False)
    )
    head = encoder.base_model.get_output_embeddings()
    params = head_parameters(head)
    assert len(params) == 3 and params[0] is head.base_layer.weight  # base weight, A, B
    weight, _ = head_params(head)
    torch.testing.assert_close(weight, head.base_layer.weight + head.get_delta_weight("default"))


@pytest.mark.parametrize("pool", [fused_max_pool, fused_sum_pool])
def test_a_weight_released_before_backward_is_an_error_not_a_zero_gradient(pool):
    """What ZeRO-3 did to the old head: the weight saved for backward re-partitioned (emptied)."""
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = nn.Parameter(torch.randn(16, 8))
    out = pool(hidden, weight, torch.ones(2, 5, dtype=torch.bool), chunk_size=4)
    weight.data = torch.empty(0)  # released, as a ZeRO-3 partition outside its gather
    with pytest.raises(RuntimeError, match="released"):
        out.sum().backward()


def test_head_bias_tensor_is_a_copy_that_trains_the_bias(tiny_encoder_factory):
    encoder = tiny_encoder_factory()
    assert encoder.head_bias_tensor() is None
    encoder.head_bias = nn.Parameter(torch.linspace(-1, 1, encoder.vocab_size))
    bias = encoder.head_bias_tensor()
    assert bias.dtype == torch.float32 and bias.data_ptr() != encoder.head_bias.data_ptr()
    (bias * 2).sum().backward()
    torch.testing.assert_close(encoder.head_bias.grad, torch.full((encoder.vocab_size,), 2.0))
