"""The chunked LM head + cross-entropy: the same log-probabilities and gradients as the full logits,
without holding them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ember.models import load_model


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: soft-capped logits
def test_chunked_logprobs_and_gradients_equal_full_logits(model_factory, arch):
    path = model_factory(arch, std=0.1)
    torch.manual_seed(0)
    full_model, _ = load_model(path, dtype="float32")
    chunked_model, _ = load_model(path, dtype="float32")
    inputs = torch.randint(0, full_model.config.vocab_size, (3, 20))
    labels = torch.randint(0, full_model.config.vocab_size, (3, 20))
    labels[0, :7] = -100  # a prompt
    labels[2] = -100  # a row with nothing to train on

    logits = full_model(inputs).float()
    expected = -F.cross_entropy(logits.flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none").view(3, 20)
    expected = expected * (labels != -100)
    from ember.models import loss as loss_module

    original = loss_module.CHUNK_LOGITS
    loss_module.CHUNK_LOGITS = 7 * full_model.config.vocab_size  # several chunks, the last one partial
    try:
        ours = chunked_model(inputs, labels=labels)
    finally:
        loss_module.CHUNK_LOGITS = original
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert (ours[labels == -100] == 0).all()
    expected.sum().backward()
    ours.sum().backward()
    full = dict(full_model.named_parameters())
    for name, p in chunked_model.named_parameters():
        torch.testing.assert_close(p.grad, full[name].grad, atol=1e-5, rtol=1e-4, msg=name)


class _Outputs(TorchDispatchMode):
    """Records the shape of every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("arch,frozen_head", [("llama", False), ("gemma2", False), ("gpt2", False),
                                              ("llama", True)])
def test_summed_logprobs_fuse_the_head_gradients(model_factory, arch, frozen_head, monkeypatch):
    """reduction="sum" (the SFT loss) computes each chunk's gradients in forward: the same sum and
    gradients as the full logits (soft-capped: gemma2; tied embeddings: gpt2; a frozen head: LoRA's
    case), and backward never recomputes a logits chunk."""
    from ember.models import loss as loss_module

    path = model_factory(arch, std=0.1)
    full_model, _ = load_model(path, dtype="float32")
    fused_model, _ = load_model(path, dtype="float32")
    vocab = full_model.config.vocab_size
    for model in (full_model, fused_model):
        model.lm_head.weight.requires_grad_(not frozen_head)
    torch.manual_seed(0)
    inputs = torch.randint(0, vocab, (3, 20))
    labels = torch.randint(0, vocab, (3, 20))
    labels[0, :7] = -100
    labels[2, 5:] = -100
    expected = -F.cross_entropy(full_model(inputs).float().flatten(0, 1), labels.flatten(), reduction="sum")
    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", 7 * vocab)  # several chunks, the last one partial
    ours = fused_model(inputs, labels=labels, reduction="sum")
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-5)
    scale = 2.5 / (labels != -100).sum()  # (the trainer's loss: a mean, times a constant)
    (scale * expected).backward()
    with _Outputs() as outputs:
        (scale * ours).backward()
    assert not [s for s in outputs.shapes if s and s[-1] == vocab], "backward computed logits"
    full = dict(full_model.named_parameters())
    checked = 0
    for name, p in fused_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, full[name].grad, atol=1e-5, rtol=1e-4, msg=name)
            checked += 1
        else:
            assert p.grad is None and full[name].grad is None
    assert checked > 3
    with torch.no_grad():  # eval: no gradient work, the same sum
        torch.testing.assert_close(fused_model(inputs, labels=labels, reduction="sum"), expected.detach(),
                                   atol=1e-4, rtol=1e-5)


def test_summed_logprobs_under_bf16_autocast(model_factory):
    """Under bf16 autocast the fused sum and its gradients track the per-token path's (which runs the
    head through autocast's bf16 product too)."""
    path = model_factory("llama", std=0.1)
    a, _ = load_model(path, dtype="float32")
    b, _ = load_model(path, dtype="float32")
    torch.manual_seed(0)
    inputs = torch.randint(0, a.config.vocab_size, (2, 24))
    labels = torch.randint(0, a.config.vocab_size, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_token = a(inputs, labels=labels).sum()
        fused = b(inputs, labels=labels, reduction="sum")
    torch.testing.assert_close(fused, per_token, atol=0.05, rtol=2e-3)
    per_token.backward()
    fused.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        cos = F.cosine_similarity(p.grad.flatten().double(), q.grad.flatten().double(), dim=0)
        assert cos > 0.999, (name, float(cos))


# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's (pytest's) resident size at fork.
PEAK = """
import json, sys, torch
from ember.models import load_model
from ember.train.trainer import peak_memory_bytes
model, _ = load_model(sys.argv[1], dtype="float32")
torch.manual_seed(0)
x = torch.randint(0, model.config.vocab_size, (4, 512))
base = peak_memory_bytes(torch.device("cpu")) / 1024
if sys.argv[2] == "full":
    logits = model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
else:
    loss = -model(x[:, :-1], labels=x[:, 1:]).mean()
loss.backward()
print(json.dumps({"peak_mib": (peak_memory_bytes(torch.device("cpu")) / 1024 - base) / 1024, "loss": loss.item()}))
"""


def test_chunked_loss_never_holds_the_logits(model_factory):
    """A 64k vocabulary and 2,044 tokens: ~0.5 GiB of float32 logits (and as much for their gradient)
    on the full path; the chunked path's peak grows by a fraction of that."""
    path = model_factory("llama", vocab_size=65536, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    runs = {}
    for mode in ("full", "chunked"):
        out = subprocess.run([sys.executable, "-c", PEAK, str(path), mode], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs["chunked"]["loss"] == pytest.approx(runs["full"]["loss"], abs=1e-4)
    logits_mib = 4 * 511 * 65536 * 4 / 2**20
    assert runs["full"]["peak_mib"] > logits_mib
    assert runs["chunked"]["peak_mib"] < 0.5 * logits_mib, runs
