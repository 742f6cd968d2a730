"""The boundary between a causal LM and the influence code.

Two things cross it: the loss of each sequence in a batch (a sum over target
tokens, with labels from the data or sampled from the model), and, for each
tracked linear layer, its inputs ``a`` and output gradients ``δ`` during one
forward + backward pass. Every model (GGUF, saved folder, tiny test model)
passes through these two functions only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from curator.errors import CuratorError
from curator.influence import with_bias_column
from curator.tokens import TokenBatch

LABELS = ("data", "sampled")


def sequence_losses(model, batch: TokenBatch, labels: str = "data",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Σ_t −log p(y_t | x_<t) over each row's target tokens: (B,).

    labels="data" takes y_t = x_t (the document's or completion's own tokens);
    "sampled" draws y_t from the model's predictive distribution, which makes
    the gradient covariance the true Fisher.
    """
    predicting = _predicting_positions(model, batch)
    if predicting is None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        predicting = slice(0, batch.input_ids.shape[1] - 1)
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       logits_to_keep=predicting).logits
    logits = logits.float()
    targets = batch.target_mask[:, 1:][:, predicting]
    if labels == "data":
        y = batch.input_ids[:, 1:][:, predicting]
    elif labels == "sampled":
        with torch.no_grad():
            if not bool(torch.isfinite(logits).all()):
                bad = sorted(set(batch.owners[~torch.isfinite(logits).all(dim=-1).all(dim=-1)].tolist()))
                raise CuratorError(
                    f"the model's predictions contain NaN or infinity (on the sequences of {bad[:5]}): its "
                    f"weights or activations overflowed. Try --dtype float32, or check the model.")
            probs = torch.softmax(logits.detach(), dim=-1).reshape(-1, logits.shape[-1])
            y = torch.multinomial(probs, 1, generator=generator).reshape(targets.shape)
    else:
        raise ValueError(f"labels must be one of {LABELS}")
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    return (nll.reshape(targets.shape) * targets).sum(dim=1)


def _predicting_positions(model, batch: TokenBatch) -> torch.Tensor | None:
    """The positions whose next token is a target in some row, when that is well short of all of them.

    A query's targets are its completion only, so the vocabulary projection (a fifth of a
    small model's forward) and its backward are skipped over the prompt. Documents
    predict every token: None, and the model computes every logit as usual.
    """
    wanted = batch.target_mask[:, 1:].any(dim=0)
    if int(wanted.sum()) > 0.75 * wanted.numel() or not _accepts_logits_to_keep(type(model)):
        return None
    return torch.nonzero(wanted).flatten()


@functools.cache
def _accepts_logits_to_keep(model_class: type) -> bool:
    """Read once per model class: this runs for every batch."""
    import inspect

    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


LayerCallback = Callable[[str, torch.Tensor, torch.Tensor], None]


class LayerTracker:
    """Hands each tracked layer's (a, δ) to a callback as soon as δ is known.

    Parameters stay frozen: the backward graph starts at the lowest tracked
    layer's output, so tracking only the top blocks also stops the backward
    pass there, and no weight gradient is ever formed.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], on_layer: LayerCallback):
        self.modules = modules
        self.on_layer = on_layer
        self._inputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> LayerTracker:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            a = inputs[0].detach()
            self._inputs[name] = with_bias_column(a) if module.bias is not None else a
            if not output.requires_grad:
                output.requires_grad_(True)   # frozen below: the backward graph starts here
            output.register_hook(lambda grad: self._backward(name, grad))
            return output
        return hook

    def _backward(self, name: str, grad: torch.Tensor) -> None:
        self.on_layer(name, self._inputs.pop(name), grad.detach())


def backward_layers(model, modules: dict, batch: TokenBatch, on_layer: LayerCallback,
                    labels: str = "data", generator: torch.Generator | None = None) -> torch.Tensor:
    """One forward + backward of the summed loss; returns the per-row losses (detached)."""
    with LayerTracker(modules, on_layer):
        losses = sequence_losses(model, batch, labels, generator)
        losses.sum().backward()
    return losses.detach()
