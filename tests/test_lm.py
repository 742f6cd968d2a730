"""The loss at the boundary with the model: computed from final hidden states, a chunk of
tokens at a time, it must equal the model's own cross-entropy, value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tinylm import tiny_llama, tiny_tokenizer

from curator.model.losses import _output_head, sequence_losses, token_losses
from curator.model.tokens import Window, pad_batch


@pytest.mark.parametrize("chunk_tokens", [1, 3, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_token_losses_equal_cross_entropy_and_its_gradient(chunk_tokens, bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 6, generator=g, dtype=torch.float64)
    b = torch.randn(40, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, 40, (10,), generator=g)
    scale = torch.rand(10, generator=g, dtype=torch.float64)   # an upstream gradient that is not all ones

    ours = token_losses(hidden, weight, b, y, chunk_tokens=chunk_tokens)
    (ours * scale).sum().backward()
    ours_grad, hidden.grad = hidden.grad.clone(), None
    theirs = F.cross_entropy(F.linear(hidden, weight, b), y, reduction="none")
    (theirs * scale).sum().backward()

    assert ours.dtype == torch.float64   # never below float32; float64 stays
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, hidden.grad, rtol=1e-10, atol=1e-12)


def test_sampled_labels_come_from_the_models_own_distribution():
    # Each token's distribution puts almost all its mass on one class, which the draw must find.
    classes = torch.tensor([3, 0, 7, 7, 1])
    weight = torch.eye(8) * 40.0
    hidden = F.one_hot(classes, 8).float()
    nll = token_losses(hidden, weight, None, None, torch.rand(5, generator=torch.Generator().manual_seed(0)),
                       chunk_tokens=2)
    expected = F.cross_entropy(hidden @ weight.T, classes, reduction="none")
    torch.testing.assert_close(nll, expected)
    assert float(nll.max()) < 1e-6


def test_a_frozen_head_is_required():
    weight = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        token_losses(torch.randn(2, 3), weight, None, torch.tensor([0, 1]))


def batch_with_padding_and_prompts():
    return pad_batch([Window(0, (5, 9, 14, 2, 7, 30, 11)), Window(1, (8, 3, 21, 40), first_target=2),
                      Window(2, (4, 6))], pad_id=0)


def own_losses(model, batch):
    """The loss as any training loop writes it: the model's logits, shifted, masked."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    nll = F.cross_entropy(logits.transpose(1, 2).float(), batch.input_ids[:, 1:], reduction="none")
    return (nll * batch.target_mask[:, 1:]).sum(dim=1)


def test_sequence_losses_from_hidden_states_equal_the_models_loss():
    model = tiny_llama(layers=2)
    model.requires_grad_(False)
    batch = batch_with_padding_and_prompts()
    assert _output_head(model, batch) is model.lm_head
    torch.testing.assert_close(sequence_losses(model, batch), own_losses(model, batch), rtol=1e-5, atol=1e-5)
    model.requires_grad_(True)      # a training step: the head's weights need their gradient
    assert _output_head(model, batch) is None
    sequence_losses(model, batch).sum().backward()
    assert model.lm_head.weight.grad is not None


def test_a_head_that_transforms_its_logits_keeps_the_models_own_route():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tiny_tokenizer()), hidden_size=16, intermediate_size=24,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                          final_logit_softcapping=0.5, max_position_embeddings=64)
    model = Gemma2ForCausalLM(config).eval()
    model.requires_grad_(False)
    batch = batch_with_padding_and_prompts()
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
    assert _output_head(model, batch) is None     # soft-capped logits: the hidden-state route would differ
    torch.testing.assert_close(sequence_losses(model, batch), own_losses(model, batch), rtol=1e-5, atol=1e-5)
