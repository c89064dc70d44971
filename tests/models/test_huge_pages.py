"""Weights re-homed into one huge-page-backed buffer: same values, same parameters, same outputs."""

import mmap

import pytest
import torch

from ember.models import load_model
from ember.models.huge_pages import HUGE_PAGE, rehome_weights


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no madvise(MADV_HUGEPAGE) here")
def test_rehomed_weights_keep_values_identity_and_ties(model_factory):
    model, _ = load_model(str(model_factory("qwen2")), dtype="float32")  # qwen2 ties lm_head to the embedding
    params = dict(model.named_parameters(remove_duplicate=False))
    before = {name: p.detach().clone() for name, p in params.items()}
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        expected = model(ids)

    moved = rehome_weights(model, min_bytes=0)

    assert moved >= sum(t.numel() * t.element_size() for t in before.values()) // 2  # tied weights once
    after = dict(model.named_parameters(remove_duplicate=False))
    assert all(after[name] is params[name] for name in params)  # the same Parameter objects
    assert all(torch.equal(after[name], before[name]) for name in params)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    start = min(p.data_ptr() for p in after.values())
    assert start % HUGE_PAGE == 0
    with torch.no_grad():
        assert torch.equal(model(ids), expected)


def test_small_models_stay_where_they_are(model_factory):
    model, _ = load_model(str(model_factory("llama")), dtype="float32")
    pointers = [p.data_ptr() for p in model.parameters()]
    assert rehome_weights(model) == 0  # below the 16 MiB default: not worth a mapping
    assert [p.data_ptr() for p in model.parameters()] == pointers


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no madvise(MADV_HUGEPAGE) here")
def test_kv_cache_over_2_mib_is_allocated_on_a_huge_page_boundary():
    from ember.engine.attention.torch_paged import KVLayout

    caches = KVLayout(paired=False, dtype=torch.bfloat16).allocate(2, 512, 4, 16, 64)  # 2 x 4 MiB
    k0, v0 = caches[0]
    assert k0.data_ptr() % HUGE_PAGE == 0 and v0.data_ptr() == k0.data_ptr() + k0.stride(0) // 2 * k0.element_size()
    assert k0.shape == (512, 4, 64, 16) and v0.shape == (512, 4, 16, 64)
    k0.fill_(1.5)  # writable, and layers do not overlap
    assert not caches[1][0].eq(1.5).any()
    small = KVLayout(dtype=torch.float32).allocate(1, 4, 1, 16, 8)[0][0]  # 4 KiB: plain allocation
    assert small.shape == (4, 1, 8, 16)
