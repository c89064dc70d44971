"""float32 training products through oneDNN (ember/models/fp32_matmul.py): same values and gradients as
a float64 reference, taken only where autograd records a float32 CPU product big enough."""

import pytest
import torch
import torch.nn.functional as F

from ember.models import fp32_matmul
from ember.models.layers import Linear

pytestmark = pytest.mark.skipif(not fp32_matmul.available(), reason="this PyTorch build has no oneDNN")


def _reference(x, weight, bias, grad):
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    y = F.linear(x64, w64, b64)
    y.backward(grad.double())
    return y, x64.grad, w64.grad, None if b64 is None else b64.grad


def _close(a, b, scale):
    # float32 sums of ~K products of unit-sized values: errors ~1e-7 * sqrt(K) * scale; allow 1e-5 relative
    assert a.dtype == torch.float32
    torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(96, 160), (3, 40, 160)])
@pytest.mark.parametrize("out_features", [200, 120])  # the weight's gradient: either operand goes first
def test_linear_values_and_gradients_match_float64(with_bias, shape, out_features):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    weight = torch.randn(out_features, 160, requires_grad=True)
    bias = torch.randn(out_features, requires_grad=True) if with_bias else None
    y = fp32_matmul.linear(x, weight, bias)
    assert y is not None and y.shape == (*shape[:-1], out_features)
    grad = torch.randn(y.shape)
    y.backward(grad)
    ref_y, ref_x, ref_w, ref_b = _reference(x, weight, bias, grad)
    _close(y.detach(), ref_y, ref_y.abs().max().item())
    _close(x.grad, ref_x, ref_x.abs().max().item())
    _close(weight.grad, ref_w, ref_w.abs().max().item())
    if with_bias:
        _close(bias.grad, ref_b, ref_b.abs().max().item())


def test_frozen_weight_and_non_contiguous_input():
    torch.manual_seed(1)
    base = torch.randn(160, 128, requires_grad=True)
    x = base.t()  # [128, 160], a transposed view
    weight = torch.randn(96, 160)  # frozen (LoRA's base weight)
    y = fp32_matmul.linear(x, weight, None)
    assert y is not None
    grad = torch.randn(y.shape)
    y.backward(grad)
    ref = (grad.double() @ weight.double()).t()
    _close(base.grad, ref, ref.abs().max().item())
    assert weight.grad is None


def test_taken_only_for_recorded_float32_products_worth_it():
    big_x = torch.randn(128, 256, requires_grad=True)
    big_w = torch.randn(256, 256)
    assert fp32_matmul.linear(big_x, big_w, None) is not None
    with torch.no_grad():  # the engine's float32 products stay as they were
        assert fp32_matmul.linear(big_x, big_w, None) is None
    assert fp32_matmul.linear(big_x.detach(), big_w, None) is None
    small = torch.randn(4, 16, requires_grad=True)  # oneDNN's call cost would dominate
    assert fp32_matmul.linear(small, torch.randn(16, 16), None) is None
    assert fp32_matmul.linear(big_x.bfloat16(), big_w.bfloat16(), None) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp32_matmul.linear(big_x, big_w, None) is None


def test_model_linear_takes_it_in_training(monkeypatch):
    calls = []
    real = fp32_matmul._Linear.apply
    monkeypatch.setattr(fp32_matmul._Linear, "apply", lambda *a: calls.append(1) or real(*a))
    layer = Linear(256, 256)
    layer(torch.randn(64, 256)).sum().backward()
    assert calls and layer.weight.grad is not None


@pytest.mark.parametrize("rows", [7, 60, 300])  # (7: MKL's addmm_, too small for oneDNN)
def test_weight_gradient_accumulates_in_slices(monkeypatch, rows):
    monkeypatch.setattr(fp32_matmul, "WEIGHT_GRAD_SLICE", 50 * 64)  # 50 rows of out per product
    torch.manual_seed(2)
    a, b = torch.randn(rows, 333), torch.randn(rows, 64)
    out = torch.randn(333, 64)
    expected = out.double() + a.double().t() @ b.double()
    fp32_matmul.add_matmul_tn(out, a, b)
    _close(out, expected, expected.abs().max().item())


def test_operands_reach_onednn_row_or_column_major():
    """A column slice as oneDNN's weight ran ~1000x slower (its reference kernel): such views are copied."""
    wide = torch.randn(300, 1000)
    sliced = wide[:, :200]
    assert fp32_matmul._dense(sliced).is_contiguous()
    assert fp32_matmul._dense(wide) is wide and fp32_matmul._dense(wide.t()).data_ptr() == wide.data_ptr()
    x = torch.randn(64, 300)
    expected = x.double() @ sliced.double()
    _close(fp32_matmul.matmul_nt(x, sliced.t()), expected, expected.abs().max().item())


def test_fused_head_loss_through_onednn_matches_full_logits(monkeypatch):
    """The fused LM head + cross-entropy (loss.py) with its products on oneDNN: several chunks, the head's
    gradient in several slices; sum and gradients equal a float64 full-logits computation."""
    from ember.models.loss import token_logprob_sum

    monkeypatch.setattr(fp32_matmul, "WEIGHT_GRAD_SLICE", 1000 * 64)
    torch.manual_seed(3)
    head = torch.nn.Linear(64, 4096, bias=False)
    hidden = torch.randn(2, 150, 64, requires_grad=True)
    labels = torch.randint(0, 4096, (2, 150))
    labels[0, :20] = -100
    assert fp32_matmul.usable(hidden.detach().reshape(-1, 64)[:100], head.weight)
    total = token_logprob_sum(hidden, labels, head, None, head, 4096, chunk_logits=100 * 4096)
    total.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), head.weight.detach().double().requires_grad_()
    logp = torch.log_softmax(h64 @ w64.t(), dim=-1)
    keep = labels != -100
    ref = logp[keep].gather(1, labels[keep][:, None]).sum()
    ref.backward()
    assert abs(total.item() - ref.item()) <= 1e-5 * abs(ref.item())
    _close(hidden.grad, h64.grad, h64.grad.abs().max().item())
    _close(head.weight.grad, w64.grad, w64.grad.abs().max().item())
