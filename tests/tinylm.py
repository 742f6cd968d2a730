"""Tiny real language models for tests: a Llama config built in code and a
byte-level BPE tokenizer trained on a few sentences. No hub, no downloads."""

from __future__ import annotations

import functools
from pathlib import Path

TRAINING_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "The slope of the line through (1, 2) and (3, 6) is (6 - 2) / (3 - 1) = 2.",
    "Solve for x: 3x + 4 = 10. Subtract 4: 3x = 6. Divide by 3: x = 2.",
    "Calculate the answer: (5 + 3) * 2 = 8 * 2 = 16.",
    "Paris is the capital of France. The Nile is a river in Africa.",
    "for i in range(10):\n    print(i * i)\n",
]


@functools.cache
def tiny_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(TRAINING_TEXT * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")


def word_tokenizer(words: list[str]):
    """A word-level tokenizer over `words` plus <eos> and <unk>: a vocabulary small enough to sum over."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")


def tiny_llama(vocab_size: int | None = None, layers: int = 2, hidden: int = 16, intermediate: int = 24,
               seed: int = 0, bias: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size or len(tiny_tokenizer()), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        mlp_bias=bias, attention_bias=bias, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger weights than the default init, so gradients are not all tiny and alike.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.3)
    return model.eval()


def loaded_tiny(seed: int = 0, **kwargs):
    from curator.model.loading import wrap_model

    return wrap_model(tiny_llama(seed=seed, **kwargs), tiny_tokenizer(), name=f"tiny-llama-{seed}")


def save_tiny(directory: Path, seed: int = 0, **kwargs) -> Path:
    model = tiny_llama(seed=seed, **kwargs)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
