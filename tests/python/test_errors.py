"""Bad input from Python gets ValueError / TypeError naming the argument, field or shape, and
the interpreter (and the model) survive it."""
import json
import re

import numpy as np
import pytest

from hybrid_mamba import HybridMambaConfig, HybridMambaModel, Tokenizer


@pytest.fixture(scope="module")
def tiny():
    return HybridMambaModel(HybridMambaConfig.from_preset("tiny"), seed=1)


@pytest.mark.parametrize("kwargs,field", [
    ({"d_model": -1}, "d_model"),
    ({"d_model": "512"}, "d_model"),
    ({"dmodel": 512}, "dmodel"),
    ({"attention_layers": [3, 3]}, "attention_layers"),
    ({"hybrid": "both"}, "hybrid"),
    ({"routing_mode": "fast"}, "routing_mode"),
    ({"d_model": 100, "n_heads": 8}, "n_heads"),
    ({"hybrid": "true"}, "true_layers"),
])
def test_config_errors_are_config_json_errors(kwargs, field, tmp_path, hm):
    """The message names the field and is the one hm gives for the same config.json."""
    with pytest.raises(ValueError) as e:
        HybridMambaConfig(**kwargs)
    msg = str(e.value)
    assert msg.startswith("config: ") and f"'{field}'" in msg
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**HybridMambaConfig().to_dict(), **kwargs}))
    cli = hm("init", "--config", path, "--out", tmp_path / "out", check=False)
    # hm names the file where Python says "config".
    assert cli.returncode == 1 and msg[len("config: "):] in cli.stderr


def test_config_unsupported_type_and_numpy_values():
    with pytest.raises(TypeError, match="'attention_layers' has an unsupported type set"):
        HybridMambaConfig(attention_layers={1, 2})
    c = HybridMambaConfig(d_model=np.int64(64), n_heads=np.int32(4), n_kv_heads=4,
                          attention_layers=np.array([1, 2]), vocab_size=300)
    assert c.d_model == 64 and c.attention_layers == [1, 2]
    c.d_model = 0
    with pytest.raises(ValueError, match="'d_model' must be"):
        c.validate()
    with pytest.raises(ValueError, match="'d_model' must be"):
        HybridMambaModel(c)


def test_model_construction_errors(tmp_path):
    with pytest.raises(TypeError, match="config must be a HybridMambaConfig, got dict"):
        HybridMambaModel({"d_model": 64})
    true_cfg = HybridMambaConfig.from_preset("true-tiny")
    with pytest.raises(ValueError, match="use_true_hybrid=False"):
        HybridMambaModel(true_cfg, use_true_hybrid=False)
    with pytest.raises(ValueError, match="device must be \"cpu\" or \"cuda\""):
        HybridMambaModel(HybridMambaConfig.from_preset("tiny"), device="tpu")
    with pytest.raises(ValueError, match="the cpu backend does not compute in it \\(cpu: f32 only\\)"):
        HybridMambaModel(HybridMambaConfig.from_preset("tiny"), dtype="bf16")
    with pytest.raises(ValueError, match="type must be f32, bf16 or f16, got 'f64'"):
        HybridMambaModel(HybridMambaConfig.from_preset("tiny"), dtype="f64")
    with pytest.raises(ValueError, match="is not a directory"):
        HybridMambaModel.from_pretrained(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{\"d_model\": 32, \"n_layers\": 1, \"vocab_size\": 10}")
    with pytest.raises(ValueError, match="model.safetensors"):
        HybridMambaModel.from_pretrained(tmp_path / "broken")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        HybridMambaConfig.from_preset("huge")


def test_cuda_unavailable_is_a_clear_error(tmp_path):
    # This suite runs where there is no GPU (CI): device="cuda" names why; with a GPU, it loads.
    try:
        m = HybridMambaModel(HybridMambaConfig.from_preset("tiny"), device="cuda")
    except ValueError as e:
        assert re.search(r'device "cuda": (this build has no CUDA backend|no usable CUDA device)', str(e)), str(e)
        with pytest.raises(ValueError, match='device "cuda": '):
            HybridMambaModel.from_pretrained(tmp_path, device="cuda")
        return
    assert (m.device, m.dtype) == ("cuda", "bf16")


def test_input_errors(tiny):
    with pytest.raises(TypeError, match="input_ids must hold integer token ids, got dtype float64"):
        tiny(np.array([[1.0, 2.0]]))
    with pytest.raises(TypeError, match="dtype bool"):
        tiny(np.array([True, False]))
    with pytest.raises(ValueError, match=r"must be 1-D \[tokens\] or 2-D \[batch, tokens\], got shape \(1, 2, 3\)"):
        tiny(np.zeros((1, 2, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="token id -1, outside"):
        tiny([[1, -1]])
    with pytest.raises(ValueError, match="token id 4294967296"):
        tiny([[1, 2**32]])
    with pytest.raises(ValueError, match="300"):  # the engine names the id and the vocabulary
        tiny([[1, 300]])
    with pytest.raises(ValueError, match="at least one token"):
        tiny(np.zeros((1, 0), dtype=np.int32))
    with pytest.raises(ValueError, match="rectangular"):
        tiny([[1, 2], [3]])
    np.testing.assert_array_equal(tiny([[1, 2]]), tiny([[1, 2]]))  # still works


def test_generate_errors(tiny):
    with pytest.raises(ValueError, match="temperature"):
        tiny.generate([1, 2], 5, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        tiny.generate([1, 2], 5, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        tiny.generate([1, 2], -1)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        tiny.generate([[1, 2], []], 5)
    with pytest.raises(ValueError, match="kv"):
        tiny.generate([1, 2], 5, kv_type="f8")
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        tiny.generate([1, 2], 5, seed=-3)
    with pytest.raises(ValueError, match="context size 4"):
        tiny.generate([1, 2], 5, ctx=4)
    with pytest.raises(ValueError, match="generate_text needs a tokenizer"):
        tiny.generate_text("hi")
    with pytest.raises(ValueError, match="no true-hybrid layers"):
        tiny.get_routing_analysis([1, 2, 3])


def test_callback_exception_propagates_and_model_survives(tiny):
    want = tiny.generate([1, 2, 3], 8, seed=4)
    it = tiny.generate_stream([1, 2, 3], 8, seed=4)
    next(it)
    with pytest.raises(ZeroDivisionError):
        for _ in tiny.generate_stream([[1, 2, 3]], 8, kv_type="f16", top_k=None, top_p=None,
                                      min_p=None, seed=4):
            1 / 0
    it.close()
    np.testing.assert_array_equal(tiny.generate([1, 2, 3], 8, seed=4), want)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        Tokenizer.byte().decode_bytes([999])
    (tmp_path / "tokenizer.json").write_text("{\"type\": \"wordpiece\"}")
    with pytest.raises(ValueError, match="wordpiece"):
        Tokenizer.load(str(tmp_path))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        Tokenizer.byte().encode(b"\xff")


def test_fit_errors(tiny):
    with pytest.raises(ValueError, match="fewer than seq_len"):
        tiny.fit(np.arange(10), seq_len=16, steps=1)
    with pytest.raises(ValueError, match="tokens and targets must both be 2-D"):
        tiny.fit(np.zeros((4, 8), np.int32), np.zeros((4, 9), np.int32), steps=1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        tiny.fit(np.arange(100), seq_len=8, steps=0)
    with pytest.raises(ValueError, match="target 300"):  # the engine checks targets vs vocab
        tiny.fit(np.zeros((4, 8), np.int32), np.full((4, 8), 300, np.int32), steps=1, batch_size=2)
