"""The package's behaviour: array-likes in, NumPy out, the GIL released, streaming, routing,
tokenizers, and training and evaluation through the engine."""
import threading
import time

import numpy as np
import pytest

import hybrid_mamba as hmpy
from hybrid_mamba import HybridMambaConfig, HybridMambaModel


@pytest.fixture(scope="module")
def tiny():
    return HybridMambaModel(HybridMambaConfig.from_preset("tiny"), seed=1)


class ArrayLike:
    """Exposes only __array__ (as MLX arrays do)."""
    def __init__(self, a):
        self.a = a

    def __array__(self, dtype=None):
        return self.a if dtype is None else self.a.astype(dtype)


class DLPackOnly:
    """Exposes only DLPack (as some GPU-framework arrays do)."""
    def __init__(self, a):
        self.a = a

    def __dlpack__(self, stream=None):
        return self.a.__dlpack__()

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def test_array_likes_give_equal_logits(tiny):
    import torch
    ids = [[3, 1, 4, 1, 5, 9, 2, 6]]
    want = tiny(np.array(ids, dtype=np.int32))
    assert want.dtype == np.float32 and want.shape == (1, 8, 300)
    wide = np.array([[3, 0, 1, 0, 4, 0, 1, 0, 5, 0, 9, 0, 2, 0, 6, 0]], dtype=np.int64)
    for x in (ids, tuple(map(tuple, ids)), np.array(ids, dtype=np.int64), np.array(ids, dtype=np.uint16),
              wide[:, ::2], ArrayLike(np.array(ids)), DLPackOnly(np.array(ids)), torch.tensor(ids)):
        np.testing.assert_array_equal(tiny(x), want)
    np.testing.assert_array_equal(tiny(ids[0]), want[0])  # 1-D in, [T, V] out
    # generate takes the same forms, and a list of NumPy scalars is one prompt, not a batch
    g = tiny.generate(ids[0], 4, seed=1)
    for x in ([np.int64(t) for t in ids[0]], np.array(ids[0], dtype=np.uint8), torch.tensor(ids[0])):
        np.testing.assert_array_equal(tiny.generate(x, 4, seed=1), g)
    np.testing.assert_array_equal(tiny.generate([np.array(ids[0])], 4, seed=1), g[None, :])


def test_batch_rows_are_independent(tiny):
    a, b = [7, 8, 9, 10], [11, 12, 13, 14]
    both = tiny([a, b])
    np.testing.assert_allclose(both[0], tiny(a), rtol=0, atol=1e-5)
    np.testing.assert_allclose(both[1], tiny(b), rtol=0, atol=1e-5)


def test_long_input_is_prefilled_in_chunks(tiny):
    """600 tokens cross the 512-token prefill chunk; the logits of the first 512 positions
    are those of the first 512 tokens alone (causality), and the rest continue them."""
    ids = np.random.default_rng(0).integers(0, 300, size=600)
    full = tiny(ids)
    np.testing.assert_allclose(full[:512], tiny(ids[:512]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(full[:520], tiny(ids[:520]), rtol=0, atol=1e-4)


def test_gil_is_released_during_compute():
    model = HybridMambaModel(HybridMambaConfig(d_model=256, n_layers=4, attention_layers=[1, 3],
                                               vocab_size=4096), seed=0)
    ids = np.random.default_rng(0).integers(0, 4096, size=(4, 400))
    span = {}

    def work():
        span["t0"] = time.perf_counter()
        model(ids)
        span["t1"] = time.perf_counter()

    ticks = []
    t = threading.Thread(target=work)
    t.start()
    while t.is_alive():
        ticks.append(time.perf_counter())
    t.join()
    dur = span["t1"] - span["t0"]
    inside = [x for x in ticks if span["t0"] + 0.2 * dur < x < span["t1"] - 0.2 * dur]
    # With the GIL held for the call this loop could not run at all in the middle of it.
    assert dur > 0.02 and len(inside) > 100


def test_generate_stream_equals_generate(tiny):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    want = tiny.generate(prompts, 12, seed=9)
    got = [[], []]
    for seq, token in tiny.generate_stream(prompts, 12, seed=9):
        got[seq].append(token)
    for i, p in enumerate(prompts):
        assert p + got[i] == want[i].tolist()
    # Leaving the loop early stops the generation (and the model stays usable).
    it = tiny.generate_stream([1, 2, 3], 200, seed=9)
    first = [next(it) for _ in range(3)]
    it.close()
    assert [t for _, t in first] == want[0][3:6].tolist()
    for row, w in zip(tiny.generate(prompts, 12, seed=9), want):
        np.testing.assert_array_equal(row, w)


def test_generate_stream_runs_in_the_callers_thread(tiny):
    # No second thread to wake per token: each engine step runs when the next token is asked for.
    import threading
    before = threading.active_count()
    counts = [threading.active_count() for _ in tiny.generate_stream([[1, 2, 3]], 6, seed=1)]
    assert counts == [before] * 6
    assert tiny.last_stats["decoded_tokens"] == 6


def test_generate_options(tiny):
    p = [10, 20, 30]
    greedy = tiny.generate(p, 15, temperature=0)
    np.testing.assert_array_equal(tiny.generate(p, 15, temperature=0, seed=123), greedy)
    # Greedy (with the default repetition penalty switched off) is the arg-max of the
    # forward's last logits, token after token.
    plain = tiny.generate(p, 15, temperature=0, repetition_penalty=None)
    for k in range(15):
        assert plain[len(p) + k] == int(np.argmax(tiny(plain[:len(p) + k])[-1]))
    assert tiny.last_stats["decoded_tokens"] == 15 and tiny.last_stats["prompt_tokens"] == 3
    # eos stops a row early, leaving a ragged result.
    eos = int(plain[len(p) + 4])
    stop = len(p) + plain[len(p):].tolist().index(eos) + 1  # the first time eos is sampled
    rows = tiny.generate([p, [7, 7]], 15, temperature=0, repetition_penalty=None, eos_token_id=eos)
    assert isinstance(rows, list) and rows[0].tolist() == plain[:stop].tolist()
    # A list stops at any of its tokens (transformers' eos_token_id takes one too): the earlier wins.
    first = int(plain[len(p) + 2])
    stop2 = len(p) + plain[len(p):].tolist().index(first) + 1
    rows = tiny.generate(p, 15, temperature=0, repetition_penalty=None, eos_token_id=[eos, first])
    assert rows.tolist() == plain[:min(stop, stop2)].tolist()
    ids = tiny.generate(p, 15, kv_type="f32", top_k=None, top_p=None, min_p=None)
    assert len(ids) == 18


def test_routing_analysis_hard_routes():
    cfg = HybridMambaConfig.from_preset("true-tiny")
    cfg.routing_mode = "hard"
    model = HybridMambaModel(cfg, use_true_hybrid=True, seed=5)
    ids = np.random.default_rng(2).integers(0, 300, size=(2, 30))
    a = model.get_routing_analysis(ids)
    assert a["mode"] == "hard" and [l["layer"] for l in a["layers"]] == [1, 4]
    for l in a["layers"]:
        share = l["attention_share"]
        assert share.shape == (2, 30) and set(np.unique(share)) <= {0.0, 1.0}
        routes = np.array(l["route"])
        np.testing.assert_array_equal(routes == "attention", share == 1.0)
        np.testing.assert_array_equal(share == 1.0, l["p"] > 0.5)
        assert l["usage"]["attention"] == pytest.approx(share.mean())
    assert a["average_usage"]["attention"] == pytest.approx(np.mean([l["usage"]["attention"] for l in a["layers"]]))
    single = model.get_routing_analysis(ids[1])
    np.testing.assert_array_equal(single["layers"][0]["attention_share"], a["layers"][0]["attention_share"][1])


def test_tokenizers(tmp_path):
    byte = hmpy.Tokenizer.byte()
    ids = byte.encode("héllo")
    assert ids.dtype == np.int32 and ids[0] == byte.bos and len(ids) == 1 + len("héllo".encode())
    assert byte.decode(ids.tolist()) == "héllo"
    assert byte.decode([0xC3]) == "\ufffd"  # a cut character, as hm generate prints it
    assert byte.decode_bytes([0xC3]) == b"\xc3"
    dec = hmpy.StreamDecoder(byte)
    assert dec.push(0xC3) == "" and dec.push(0xA9) == "é" and dec.flush() == ""
    texts = ["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20]
    bpe = hmpy.Tokenizer.train_bpe(texts, 300, str(tmp_path / "bpe"))
    assert bpe.type == "sentencepiece" and bpe.vocab_size == 300
    enc = bpe.encode("the cat ran", add_bos=False)
    assert bpe.decode(enc.tolist()) == "the cat ran" and len(enc) < len("the cat ran")
    assert hmpy.Tokenizer.load(str(tmp_path / "bpe")).encode("the cat", False).tolist() == bpe.encode("the cat", False).tolist()


def test_fit_on_token_arrays_learns_a_pattern():
    model = HybridMambaModel(HybridMambaConfig.from_preset("tiny"), seed=0)
    stream = np.tile(np.arange(10, 26), 200)  # period 16: perfectly predictable after one period
    seen = []
    hist = model.fit(stream, steps=120, batch_size=4, seq_len=32, lr=1e-2, seed=1,
                     callback=lambda s, n, loss: seen.append((s, n)))
    assert seen[0] == (1, 120) and seen[-1] == (120, 120) and len(hist) == 120
    assert hist[-1]["loss"] < 0.2 * hist[0]["loss"]
    logits = model(stream[:64])
    assert (logits[16:63].argmax(-1) == stream[17:64]).mean() > 0.9
    # callback returning False stops
    assert len(model.fit(stream, steps=10, seq_len=16, callback=lambda s, n, l: s < 3)) == 3


def test_fit_on_task_rows_and_task_eval():
    model = HybridMambaModel(HybridMambaConfig(d_model=64, n_layers=2, attention_layers=[1], vocab_size=16,
                                               n_heads=2, n_kv_heads=2, d_state=8), seed=0)
    x, y = hmpy.tasks.examples("induction", 256, seq_len=24, vocab=16)
    assert x.shape == y.shape == (256, 24) and (y >= 0).sum() == 256  # one scored position per row
    before = model.evaluate_task("induction", n=128, seq_len=24, vocab=16)
    model.fit(x, y, steps=150, batch_size=16, lr=3e-3)
    after = model.evaluate_task("induction", n=128, seq_len=24, vocab=16)
    assert after["loss"] < before["loss"]
    assert hmpy.tasks.chance_accuracy("induction", seq_len=24, vocab=16) == pytest.approx(1 / 14)


def test_trainer_checkpoints_resume_and_evaluate(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    common = dict(data=corpus, preset="tiny", steps=30, batch=4, seq_len=32, eval_every=0, save_every=10,
                  eval_tokens=2048, progress=False, threads=2)
    steps = []
    whole = hmpy.Trainer(tmp_path / "whole", **common).train(lambda s, n, loss: steps.append(s))
    assert steps == list(range(1, 31))
    hmpy.Trainer(tmp_path / "split", stop_after=20, **common).train()
    resumed = []
    split = hmpy.Trainer(tmp_path / "split", resume=True, **common).train(lambda s, n, l: resumed.append(s))
    assert resumed == list(range(21, 31))
    ids = whole.tokenizer.encode("the quick brown")
    np.testing.assert_array_equal(split(ids), whole(ids))  # exact resume
    ev = hmpy.evaluate(tmp_path / "whole", corpus)
    assert ev["step"] == 30 and ev["tokens"] > 0 and np.isfinite(ev["perplexity"])
    assert ev["perplexity"] == pytest.approx(np.exp(ev["loss"]))


def test_trainer_device_and_dtype_settings(tmp_path):
    # device / dtype reach hm train's TrainConfig; what a machine cannot do is a clear error.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox.\n" for i in range(200)))
    common = dict(data=corpus, preset="tiny", steps=2, batch=2, seq_len=16, progress=False, threads=1)
    with pytest.raises(ValueError, match="bf16 on --device cuda only"):
        hmpy.Trainer(tmp_path / "a", dtype="bf16", **common).train()
    with pytest.raises(ValueError, match="cpu|cuda"):
        hmpy.Trainer(tmp_path / "b", device="tpu", **common)
    t = hmpy.Trainer(tmp_path / "c", device="cuda", **common)
    assert t._c.device == "cuda" and t._c.dtype == "bf16"
    if not hmpy._core.cuda_available():
        with pytest.raises(ValueError, match="cuda"):
            t.train()
    model = hmpy.Trainer(tmp_path / "d", device="cpu", dtype="f32", **common).train()
    assert model.config.vocab_size > 0


def test_trainer_interrupt_saves_and_resumes(tmp_path):
    """KeyboardInterrupt in the callback stops as Ctrl-C stops hm train: that step is saved and
    a resume continues after it. Any other exception ends the run at once."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc def ghi\n" * 300)
    common = dict(data=corpus, steps=12, batch=2, seq_len=16, progress=False, save_every=0, eval_every=0)

    def stop(step, steps, loss):
        if step == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt, match="after step 5 of 12"):
        hmpy.Trainer(tmp_path / "run", **common).train(stop)
    seen = []
    hmpy.Trainer(tmp_path / "run", resume=True, **common).train(lambda s, n, l: seen.append(s))
    assert seen == list(range(6, 13))
    with pytest.raises(ZeroDivisionError):
        hmpy.Trainer(tmp_path / "other", **common).train(lambda s, n, l: 1 / 0)


def test_compare_runs_every_architecture(tmp_path):
    runs, table = hmpy.compare(tmp_path / "cmp", task="mqar", sizes=[32], seq_lens=[32], lrs=[3e-3],
                               budget=5, batch=4, task_vocab=64, test_examples=16, progress=False)
    assert sorted(r["arch"] for r in runs) == sorted(hmpy._core.arch_names())
    assert all(r["error"] == "" and 0 <= r["metric"] <= 1 for r in runs), runs
    assert "mamba" in table and (tmp_path / "cmp" / "results.csv").exists()


def test_type_stubs_cover_the_extension():
    """_core.pyi names exactly what the extension defines, so editors and help() agree with it."""
    import ast
    import os
    tree = ast.parse(open(os.path.join(os.path.dirname(hmpy.__file__), "_core.pyi")).read())
    stubbed = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    stubbed |= {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)}
    public = {k for k in dir(hmpy._core) if not k.startswith("_")}
    assert stubbed == public
    for cls in ("Model", "Tokenizer", "TrainConfig", "CompareConfig", "TaskSpec", "SamplingParams"):
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
        names = {m.name for m in node.body if isinstance(m, ast.FunctionDef)}
        names |= {m.target.id for m in node.body if isinstance(m, ast.AnnAssign)}
        assert names - {"__init__"} == {k for k in dir(getattr(hmpy._core, cls)) if not k.startswith("_")}, cls
    assert "Logits of every position" in hmpy.HybridMambaModel.__call__.__doc__


def test_trainer_with_a_config_object(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, hello there.\n" * 200)
    cfg = HybridMambaConfig(d_model=48, n_layers=3, attention_layers=[1], n_heads=4, n_kv_heads=4, d_state=4,
                            vocab_size=999)
    model = hmpy.Trainer(tmp_path / "run", data=corpus, config=cfg, steps=3, batch=2, seq_len=16,
                         progress=False, eval_every=0).train()
    got = model.config.to_dict()
    assert got.pop("vocab_size") == 259  # the byte tokenizer's vocabulary replaces the config's
    assert got == {k: v for k, v in cfg.to_dict().items() if k != "vocab_size"}
    with pytest.raises(TypeError, match="unknown setting 'stepz'"):
        hmpy.Trainer(tmp_path / "x", data=corpus, stepz=3)
