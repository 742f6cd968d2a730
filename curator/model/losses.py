"""The boundary between a causal LM and the influence code.

Two things cross it: the loss of each sequence in a batch (a sum over target
tokens, with labels from the data or sampled from the model), and, for each
tracked linear layer, its inputs ``a`` and output gradients ``δ`` during one
forward + backward pass. Every model (GGUF, saved folder, tiny test model)
passes through these two functions only.
"""

from __future__ import annotations

import functools
import hashlib
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from curator.errors import CuratorError
from curator.model.tokens import TokenBatch

LABELS = ("data", "sampled")


def with_bias_column(a: torch.Tensor) -> torch.Tensor:
    """Append the constant input that multiplies a linear layer's bias."""
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


def sequence_losses(model, batch: TokenBatch, labels: str = "data", seed: int = 0) -> torch.Tensor:
    """Σ_t −log p(y_t | x_<t) over each row's target tokens: (B,).

    labels="data" takes y_t = x_t (the document's or completion's own tokens);
    "sampled" draws y_t from the model's predictive distribution, which makes
    the gradient covariance the true Fisher. The draws depend only on `seed`, the
    window's document and its number in it (`label_uniforms`), so a fit draws the
    same labels whatever the batching, the chunking or the number of ranks.
    """
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}")
    head = _output_head(model, batch)
    if head is None:
        return _losses_from_logits(model, batch, labels, seed)
    return _losses_from_hidden(model, head, batch, labels, seed)


def label_uniforms(batch: TokenBatch, seed: int) -> torch.Tensor:
    """(B, T) uniform numbers in [0, 1) for inverse-CDF label sampling, one per token position.

    Each row has its own stream, seeded by (seed, owner, window number) and drawn for the
    row's real length only, so a row's numbers do not depend on the batch it is in or on
    the batch's padded width.
    """
    rows, width = batch.input_ids.shape
    out = torch.zeros(rows, width, dtype=torch.float64)
    lengths = batch.attention_mask.sum(dim=1).tolist()
    numbers = batch.windows.tolist() if batch.windows is not None else [0] * rows
    for row, (owner, number) in enumerate(zip(batch.owners.tolist(), numbers, strict=True)):
        key = hashlib.blake2b(f"{seed}:{owner}:{number}".encode(), digest_size=8).digest()
        stream = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        out[row, :lengths[row]] = torch.rand(lengths[row], generator=stream, dtype=torch.float64)
    return out.to(batch.input_ids.device)


def _sample_from_exp(exp: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws from rows of unnormalised probabilities (N, V), one uniform per row."""
    cumulative = exp.cumsum(dim=1, dtype=torch.float64)
    wanted = (uniforms.to(torch.float64) * cumulative[:, -1]).unsqueeze(1)
    return torch.searchsorted(cumulative, wanted, right=True).flatten().clamp_(max=exp.shape[1] - 1)


def _losses_from_hidden(model, head: torch.nn.Linear, batch: TokenBatch, labels: str,
                        seed: int = 0) -> torch.Tensor:
    """The loss from the final hidden states at the target positions only (`token_losses`).

    Padding and a query's prompt never reach the vocabulary projection, and the
    (tokens × vocabulary) logits exist a chunk at a time: on a 49k vocabulary they
    were most of the memory traffic of a scoring pass on the CPU.
    """
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    rows, positions = torch.nonzero(batch.target_mask[:, 1:], as_tuple=True)
    targets = batch.input_ids[rows, positions + 1] if labels == "data" else None
    # The label at position t + 1 is drawn with that position's number.
    uniforms = label_uniforms(batch, seed)[rows, positions + 1] if labels == "sampled" else None
    try:
        nll = token_losses(hidden[rows, positions], head.weight, head.bias, targets, uniforms,
                           check_finite=labels == "sampled")
    except NonFiniteLogits as error:
        raise _overflow_error(batch.owners[rows[error.tokens]]) from None
    return torch.zeros(batch.input_ids.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)


def _losses_from_logits(model, batch: TokenBatch, labels: str, seed: int = 0) -> torch.Tensor:
    """The loss from the model's own logits: for a head the hidden-state route does not reproduce
    (not a plain linear map), for a head being trained, and as the reference of `_output_head`'s check."""
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
    else:
        with torch.no_grad():
            if not bool(torch.isfinite(logits).all()):
                raise _overflow_error(batch.owners[~torch.isfinite(logits).all(dim=-1).all(dim=-1)])
            probs = torch.softmax(logits.detach(), dim=-1).reshape(-1, logits.shape[-1])
            uniforms = label_uniforms(batch, seed)[:, 1:][:, predicting].reshape(-1)
            y = _sample_from_exp(probs, uniforms).reshape(targets.shape)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    return (nll.reshape(targets.shape) * targets).sum(dim=1)


def _overflow_error(owners: torch.Tensor) -> CuratorError:
    bad = sorted(set(owners.tolist()))
    return CuratorError(
        f"the model's predictions contain NaN or infinity (on the sequences of {bad[:5]}): its "
        f"weights or activations overflowed. Try --dtype float32, or check the model.")


# -- the loss over the vocabulary, a chunk of tokens at a time --------------------------

# Measured on SmolLM2 (CPU, bf16): chunks of 128–256 tokens ran fastest, ~10% ahead of 1,024
# (a chunk of 256 × 49,152 float32 logits is 50 MB); the size only trades speed for memory.
LOSS_CHUNK_TOKENS = 256


class NonFiniteLogits(Exception):
    def __init__(self, tokens: torch.Tensor):
        super().__init__(f"non-finite logits at {tokens.numel()} tokens")
        self.tokens = tokens


def token_losses(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor | None, uniforms: torch.Tensor | None = None, *,
                 check_finite: bool = False, chunk_tokens: int | None = None) -> torch.Tensor:
    """−log softmax(W h_n + b)[y_n] for N final hidden states (N, d): (N,), in float32 at least.

    `targets` None samples each y_n from the softmax itself, by inverse CDF at `uniforms[n]`. The
    gradient with respect to `hidden` is formed here, in the same pass over each chunk's
    logits, as (softmax − onehot(y)) W; the backward only scales it. W and b are frozen.
    """
    if targets is None and uniforms is None:
        raise ValueError("sampled labels need one uniform number per token")
    return _TokenCrossEntropy.apply(hidden, weight, bias, targets, uniforms, check_finite,
                                    chunk_tokens or LOSS_CHUNK_TOKENS)


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, uniforms, check_finite, chunk_tokens):
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            raise ValueError("token_losses keeps the output head frozen; its weights must not require grad")
        wants_gradient = ctx.needs_input_grad[0]
        n = hidden.shape[0]
        nll = torch.empty(n, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        gradient = torch.empty_like(hidden) if wants_gradient else None
        for start in range(0, n, chunk_tokens):
            stop = min(start + chunk_tokens, n)
            logits = F.linear(hidden[start:stop], weight, bias)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))   # bf16 → f32, f64 stays
            if check_finite:
                finite = torch.isfinite(logits).all(dim=1)
                if not bool(finite.all()):
                    raise NonFiniteLogits(start + torch.nonzero(~finite).flatten())
            # In place, over each chunk's logits: shift by the max, pick the targets,
            # exponentiate, normalise. Each step is one pass over chunk × vocabulary.
            logits.sub_(logits.amax(dim=1, keepdim=True))
            if targets is None:
                y = _sample_from_exp(logits.exp(), uniforms[start:stop])
            else:
                y = targets[start:stop]
            picked = torch.arange(stop - start, device=logits.device)
            shifted_target = logits[picked, y]
            exp = logits.exp_()
            total = exp.sum(dim=1)
            nll[start:stop] = total.log() - shifted_target
            if gradient is not None:
                probs = exp.div_(total[:, None])
                probs[picked, y] -= 1.0
                gradient[start:stop] = probs.to(weight.dtype) @ weight
        ctx.gradient = gradient
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        gradient = ctx.gradient * grad_nll[:, None].to(ctx.gradient.dtype)
        return gradient, None, None, None, None, None, None


# Models whose output head was checked against their own logits: True where the
# hidden-state route gives the same losses. A head that transforms its logits
# (soft-capping, scaling) fails the check and keeps the model's own route.
_HEAD_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _output_head(model, batch: TokenBatch) -> torch.nn.Linear | None:
    """The model's linear output head, when computing the loss from hidden states reproduces its logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or getattr(model, "base_model", model) is model:
        return None
    if any(p.requires_grad for p in head.parameters()):
        return None     # someone trains the head (a baseline training step): the model's own route
    agrees = _HEAD_CHECKED.get(model)
    if agrees is None:
        sample = TokenBatch(batch.input_ids[:2], batch.attention_mask[:2], batch.target_mask[:2], batch.owners[:2],
                            None if batch.windows is None else batch.windows[:2])
        with torch.no_grad():
            ours = _losses_from_hidden(model, head, sample, "data")
            theirs = _losses_from_logits(model, sample, "data")
        tolerance = 1e-4 if head.weight.dtype == torch.float32 else 2e-2
        agrees = bool(torch.allclose(ours, theirs, rtol=tolerance, atol=tolerance))
        _HEAD_CHECKED[model] = agrees
    return head if agrees else None


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
                    labels: str = "data", seed: int = 0) -> torch.Tensor:
    """One forward + backward of the summed loss; returns the per-row losses (detached)."""
    with LayerTracker(modules, on_layer):
        losses = sequence_losses(model, batch, labels, seed)
        losses.sum().backward()
    return losses.detach()
