"""Python results against the engine's other faces: logits against the PyTorch peer (the
golden tests' oracle, same tolerance), sampled tokens and text against `hm generate` for the
same checkpoint, settings and seed, config errors against the CLI's messages."""
import json

import numpy as np
import pytest

import hybrid_mamba as hmpy
from hybrid_mamba import HybridMambaConfig, HybridMambaModel

TOL = 1e-4  # max |ours - peer| / max |peer|, as tests/golden (float32 KV cache)


def rel_err(ours, theirs):
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


@pytest.mark.parametrize("preset_dir", ["tiny_dir", "true_tiny_dir"])
def test_logits_equal_torch_peer(preset_dir, request, torch_peer):
    import torch
    d = request.getfixturevalue(preset_dir)
    ids = np.random.default_rng(1).integers(0, 259, size=(2, 23))
    ours = HybridMambaModel.from_pretrained(d)(ids)
    with torch.inference_mode():
        theirs = torch_peer.HybridMamba.load(str(d)).forward(torch.tensor(ids)).numpy()
    assert ours.shape == theirs.shape == (2, 23, 300)
    assert rel_err(ours, theirs) <= TOL
    # A wrong conversion would show: the rows are not interchangeable.
    assert rel_err(ours[::-1], theirs) > 100 * TOL


def test_from_config_equals_hm_init(tmp_path, hm):
    """HybridMambaModel(config, seed=s) holds the weights `hm init --seed s` writes."""
    hm("init", "--preset", "demo", "--seed", "7", "--out", tmp_path / "cli")
    ours = HybridMambaModel(HybridMambaConfig.from_preset("demo"), seed=7)
    theirs = HybridMambaModel.from_pretrained(tmp_path / "cli")
    ids = np.arange(1, 40)[None, :]
    np.testing.assert_array_equal(ours(ids), theirs(ids))
    other = HybridMambaModel(HybridMambaConfig.from_preset("demo"), seed=8)
    assert not np.array_equal(other(ids), theirs(ids))


def test_generate_text_equals_hm_generate(tiny_dir, hm):
    model = HybridMambaModel.from_pretrained(tiny_dir)
    settings = dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.3, seed=11)
    cli = hm("generate", "--model", tiny_dir, "--prompt", "Hello there", "-n", 40, "--temperature", 0.9,
             "--top-k", 20, "--top-p", 0.9, "--min-p", 0.02, "--repeat-penalty", 1.3, "--seed", 11).stdout
    ours = model.generate_text("Hello there", 40, **settings)
    assert cli == ours + "\n"
    assert len(ours) > len("Hello there")
    # The seed matters: a different one gives a different text (so equality above is not luck).
    assert model.generate_text("Hello there", 40, **{**settings, "seed": 12}) != ours


def test_ragged_batch_equals_hm_generate_batch(tiny_dir, hm):
    model = HybridMambaModel.from_pretrained(tiny_dir)
    prompts = ["a", "The quick brown fox", "xyz"]
    args = []
    for p in prompts:
        args += ["--prompt", p]
    # A batch prints each result's raw bytes (one prompt streams valid UTF-8).
    cli = hm("generate", "--model", tiny_dir, *args, "-n", 25, "--seed", 5, text=False).stdout
    tok = model.tokenizer
    ids = [tok.encode(p) for p in prompts]
    out = model.generate(ids, 25, seed=5)
    assert cli == b"".join(b"[%d] %s%s\n" % (i, p.encode(), tok.decode_bytes(o[len(ids[i]):].tolist()))
                           for i, (p, o) in enumerate(zip(prompts, out)))
    # Each row of the ragged batch equals that prompt alone (sequence i samples with seed + i).
    rows = model.generate(ids, 25, temperature=0.7, seed=5)
    for i, p in enumerate(ids):
        alone = model.generate(p, 25, temperature=0.7, seed=5 + i)
        np.testing.assert_array_equal(rows[i], alone)
        assert tok.decode(rows[i][len(p):].tolist()) == tok.decode(alone[len(p):].tolist())


def test_save_pretrained_loads_in_hm(tmp_path, hm):
    model = HybridMambaModel(HybridMambaConfig.from_preset("tiny"), seed=2)
    model.tokenizer = hmpy.Tokenizer.byte()
    model.save_pretrained(tmp_path / "m")
    info = hm("info", "--model", tmp_path / "m").stdout
    assert "layers" in info or "param" in info
    back = HybridMambaModel.from_pretrained(tmp_path / "m")
    ids = np.array([[5, 6, 7, 8]])
    np.testing.assert_array_equal(back(ids), model(ids))
    cli = hm("generate", "--model", tmp_path / "m", "--prompt", "hi", "-n", 10, "--seed", 3).stdout
    # hm generate prints with fputs, which drops NUL characters (byte token 0); the rest is equal.
    assert cli == back.generate_text("hi", 10, seed=3).replace("\0", "") + "\n"


def test_config_errors_equal_config_json_errors(tmp_path, hm):
    bad = {"d_model": 64, "n_layers": 4, "vocab_size": 300, "attention_layers": [1, 9]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(bad))
    cli = hm("init", "--config", path, "--out", tmp_path / "x", check=False)
    assert cli.returncode == 1
    with pytest.raises(ValueError) as e:
        HybridMambaConfig(**bad)
    msg = str(e.value)
    assert msg.startswith("config: 'attention_layers' index 9")
    assert msg in cli.stderr
    with pytest.raises(ValueError) as e2:
        HybridMambaConfig.from_json_file(path)
    assert msg in str(e2.value) and str(path) in str(e2.value)
