"""HybridMambaModel: the seed's model class, running on the C++ engine. Every computation
(forward, sampling, routing, training steps) is the engine's; this file converts arguments."""
import json

import numpy as np

from . import _core
from .config import HybridMambaConfig

_INT32_MAX = 2**31 - 1
_AUTO = object()  # eos_token_id's default: the tokenizer's EOS when the model has one


def _stop_ids(eos_token_id, tok):
    """The tokens that end a sequence: the tokenizer's EOS and its further stop tokens (a Hugging
    Face folder's eos_token_id lists) by default; None for none; an int or a list of ints."""
    if eos_token_id is _AUTO:
        if tok is None:
            return []
        return ([tok.eos] if tok.eos >= 0 else []) + [int(i) for i in tok.more_eos]
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, (list, tuple)):
        return [int(i) for i in eos_token_id]
    return [int(eos_token_id)]


def as_array(x, name):
    """Any array-like as a NumPy array: NumPy arrays as they are, objects exposing __array__
    (PyTorch, MLX, ...) or only DLPack through NumPy, so no copy is made where the layout
    allows; lists and tuples through np.asarray."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__dlpack__") and not hasattr(x, "__array__"):
        return np.from_dlpack(x)
    try:
        return np.asarray(x)
    except ValueError as e:  # NumPy's message for a ragged nesting
        raise ValueError(f"{name} must be a rectangular array of token ids: {e}") from None


def as_ids(x, name, lowest=0):
    """A token-id array-like as C-contiguous int32 (copied only when dtype or layout differ).
    TypeError for non-integers, ValueError for ids outside [lowest, 2^31)."""
    a = as_array(x, name)
    if a.dtype == np.bool_ or a.dtype.kind not in "iu":
        if a.size == 0 and a.dtype.kind == "f":  # np.asarray([]) is float64
            a = a.astype(np.int32)
        else:
            raise TypeError(f"{name} must hold integer token ids, got dtype {a.dtype}")
    if a.size and (a.min() < lowest or a.max() > _INT32_MAX):
        bad = a.min() if a.min() < lowest else a.max()
        raise ValueError(f"{name} holds token id {bad}, outside [{lowest}, 2^31)")
    return np.ascontiguousarray(a, dtype=np.int32)


def as_batch(x, name):
    """input_ids as a 2-D [B, T] int32 array, and whether it was 1-D [T]."""
    a = as_ids(x, name)
    if a.ndim == 1:
        return a[None, :], True
    if a.ndim != 2:
        raise ValueError(f"{name} must be 1-D [tokens] or 2-D [batch, tokens], got shape {a.shape}")
    return a, False


def as_prompts(x, name):
    """Prompts as a list of 1-D int32 arrays: a 1-D or 2-D array-like, or a list of sequences of
    different lengths (a ragged batch). Also returns whether the input was a single 1-D prompt."""
    if isinstance(x, (list, tuple)) and x and all(
            isinstance(p, (list, tuple)) or (not np.isscalar(p) and np.ndim(as_array(p, name)) > 0) for p in x):
        prompts = [as_ids(p, f"{name}[{i}]") for i, p in enumerate(x)]
        for i, p in enumerate(prompts):
            if p.ndim != 1:
                raise ValueError(f"{name}[{i}] must be 1-D [tokens], got shape {p.shape}")
        return prompts, False
    a, single = as_batch(x, name)
    return list(a), single


def _sampling(temperature, top_k, top_p, min_p, repetition_penalty, repeat_last_n, seed):
    s = _core.SamplingParams()
    s.temperature = float(temperature)
    s.top_k = 0 if top_k is None else int(top_k)
    s.top_p = 1.0 if top_p is None else float(top_p)
    s.min_p = 0.0 if min_p is None else float(min_p)
    s.repeat_penalty = 1.0 if repetition_penalty is None else float(repetition_penalty)
    s.repeat_last_n = int(repeat_last_n)
    if seed is None or int(seed) < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    s.seed = int(seed)
    return s


class HybridMambaModel:
    """A hybrid Mamba/attention language model on the hybrid-mamba engine.

    HybridMambaModel(config, use_true_hybrid=False) builds a Simple Hybrid with random weights
    (the engine's documented initialization, deterministic for `seed`). use_true_hybrid=True
    makes every layer a True Hybrid layer (both paths behind a router; config.routing_mode
    picks soft, hard or both) unless config.true_layers already names the layers. None (the
    default) follows config.hybrid. HybridMambaModel.from_pretrained(path) loads a checkpoint
    written by `hm init`, `hm train` or save_pretrained.

    Arrays: input_ids may be a list, a NumPy array or any object exposing __array__ or DLPack;
    outputs are NumPy arrays. Errors: ValueError / TypeError naming the argument, field or shape.
    The GIL is released while the engine computes; one computation runs per model at a time.
    """

    def __init__(self, config=None, use_true_hybrid=None, *, seed=0, device="cpu", dtype=None, _core_model=None):
        if _core_model is None:
            if config is None:
                config = HybridMambaConfig()
            if not isinstance(config, HybridMambaConfig):
                raise TypeError(f"config must be a HybridMambaConfig, got {type(config).__name__}")
            fields = config.to_dict()
            if use_true_hybrid and fields["hybrid"] == "simple":
                # The seed's True Hybrid: every layer holds both paths (attention_layers is
                # the Simple Hybrid's placement), unless true_layers says which.
                fields["hybrid"] = "true"
                if not fields["true_layers"]:
                    fields["true_layers"] = list(range(fields["n_layers"]))
                    fields["attention_layers"] = []
            elif use_true_hybrid is False and fields["hybrid"] == "true":
                raise ValueError("use_true_hybrid=False, but the config has hybrid \"true\" "
                                 "(true_layers " + str(fields["true_layers"]) + ")")
            text = HybridMambaConfig(**fields).to_json()
            if seed is None or int(seed) < 0:
                raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
            _core_model = _core.Model.from_config(text, int(seed), device, dtype or "")
        self._m = _core_model
        self.device = self._m.device
        self.dtype = self._m.dtype  # weights and activations: f32 on the CPU, bf16 on CUDA unless given
        self.config = HybridMambaConfig(**_without_type(json.loads(self._m.config_json)))
        self.last_stats = None  # timing of the last generate(): prefill_ms, decode_ms, tokens

    # --- loading and saving ---------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype=None):
        """Loads a checkpoint directory (config.json, model.safetensors, tokenizer), or a
        training output directory (its checkpoint/). The tokenizer comes with it. device "cuda"
        runs on the GPU (a ValueError saying why where there is none); dtype "f32", "bf16" or
        "f16" (None: f32 on the CPU, bf16 on CUDA). The checkpoint is the same for both."""
        return cls(_core_model=_core.Model.from_dir(str(path), device, dtype or ""))

    def save_pretrained(self, path, *, dtype="F32"):
        """Writes config.json, model.safetensors (F32, F16 or BF16) and the tokenizer, if the
        model has one, into path (created if needed), each file atomically. `hm generate
        --model path` loads it."""
        self._m.save(str(path), dtype)

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (encode/decode), or None for a model made from a config."""
        return self._m.tokenizer

    @tokenizer.setter
    def tokenizer(self, tok):
        self._m.set_tokenizer(tok)

    def num_parameters(self):
        return self._m.n_params

    # --- inference ------------------------------------------------------------------------
    def __call__(self, input_ids):
        """Logits of every position: [B, T] -> float32 [B, T, vocab_size] ([T] -> [T, vocab]),
        each sequence from an empty state (the engine's forward, float32 KV cache)."""
        ids, single = as_batch(input_ids, "input_ids")
        logits = self._m.forward(ids)
        return logits[0] if single else logits

    def _default_kv_type(self):
        """hm generate's: an f16 KV cache on the CPU, bf16 on CUDA."""
        return "bf16" if self.device == "cuda" else "f16"

    def _generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, min_p,
                  repetition_penalty, seed, repeat_last_n, eos_token_id, kv_type, ctx, on_token):
        prompts, single = as_prompts(input_ids, "input_ids")
        kv_type = kv_type or self._default_kv_type()
        tok = self.tokenizer
        eos = _stop_ids(eos_token_id, tok)
        sp = _sampling(temperature, top_k, top_p, min_p, repetition_penalty, repeat_last_n, seed)
        seqs, stats = self._m.generate(
            [p.tolist() for p in prompts], int(max_new_tokens), sp,
            eos,
            tok.vocab_size if tok is not None else 0, kv_type, int(ctx), on_token)
        self.last_stats = stats
        return prompts, seqs, single

    def generate(self, input_ids, max_new_tokens=64, temperature=0.8, top_k=40, top_p=0.95,
                 min_p=0.05, repetition_penalty=1.1, seed=0, *, repeat_last_n=64,
                 eos_token_id=_AUTO, kv_type=None, ctx=0):
        """Samples continuations with the engine's KV cache, recurrent state and sampling chain
        (the same as `hm generate` with the same settings and seed; sequence i samples with
        seed + i). Defaults are hm generate's; temperature 0 is greedy, top_k / top_p / min_p /
        repetition_penalty None switch that sampler off.

        input_ids: [T], [B, T], or a list of prompts of different lengths. Returns the prompt
        followed by the new tokens: a 1-D array for a 1-D prompt, a 2-D [B, T + n] array when
        every row has the same length, else a list of 1-D arrays (a ragged batch, or rows that
        stopped at EOS). eos_token_id: the tokenizer's EOS and further stop tokens by default
        (a Hugging Face folder's eos_token_id lists; none without a tokenizer), an int or a list
        of ints, as transformers takes it; None never stops early. The model's tokenizer also limits sampling to the
        ids it can decode, as hm generate does.
        """
        prompts, seqs, single = self._generate(
            input_ids, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
            repeat_last_n, eos_token_id, kv_type, ctx, None)
        rows = [np.concatenate([p, s]) for p, s in zip(prompts, seqs)]
        if single:
            return rows[0]
        if len({len(r) for r in rows}) == 1:
            return np.stack(rows)
        return rows

    def generate_stream(self, input_ids, max_new_tokens=64, temperature=0.8, top_k=40, top_p=0.95,
                        min_p=0.05, repetition_penalty=1.1, seed=0, *, repeat_last_n=64,
                        eos_token_id=_AUTO, kv_type=None, ctx=0):
        """generate() as an iterator: yields (sequence index, token id) as each token is
        sampled. Each step of the engine runs in the caller's thread when the next token is
        asked for (the GIL released meanwhile); leaving the loop early stops the generation."""
        prompts, _ = as_prompts(input_ids, "input_ids")
        kv_type = kv_type or self._default_kv_type()
        tok = self.tokenizer
        eos = _stop_ids(eos_token_id, tok)
        sp = _sampling(temperature, top_k, top_p, min_p, repetition_penalty, repeat_last_n, seed)
        stream = self._m.stream(
            [p.tolist() for p in prompts], int(max_new_tokens), sp,
            eos,
            tok.vocab_size if tok is not None else 0, kv_type, int(ctx))
        while True:
            step = stream.next()
            if not step:
                self.last_stats = stream.stats
                return
            yield from step

    def generate_text(self, prompt, max_new_tokens=64, add_bos=True, **kwargs):
        """Text in, text out with the model's tokenizer: returns prompt + completion (a str, or a
        list for a list of prompts), as `hm generate` prints it. kwargs: generate()'s."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError("generate_text needs a tokenizer: load the model with from_pretrained, "
                             "or set model.tokenizer = Tokenizer.byte()")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = [tok.encode(t, add_bos) for t in texts]
        for i, p in enumerate(ids):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty (and add_bos=False leaves no token)")
        _, seqs, _ = self._generate(ids, max_new_tokens, kwargs.pop("temperature", 0.8),
                                    kwargs.pop("top_k", 40), kwargs.pop("top_p", 0.95),
                                    kwargs.pop("min_p", 0.05), kwargs.pop("repetition_penalty", 1.1),
                                    kwargs.pop("seed", 0), kwargs.pop("repeat_last_n", 64),
                                    kwargs.pop("eos_token_id", _AUTO), kwargs.pop("kv_type", None),
                                    kwargs.pop("ctx", 0), None)
        if kwargs:
            raise TypeError(f"generate_text got unexpected arguments {sorted(kwargs)}")
        out = [t + tok.decode(s.tolist()) for t, s in zip(texts, seqs)]
        return out[0] if isinstance(prompt, str) else out

    def get_routing_analysis(self, input_ids):
        """The routers' decisions on input_ids (True Hybrid models): a dict with
        average_usage {"mamba", "attention"} (shares of the routing weight, mean over the
        true-hybrid layers and tokens), mode, and layers: per true-hybrid layer its index,
        usage, and per token attention_share, p (the router's attention probability) and route
        ("mamba" | "attention" | "both"); per-token values are [T] for a 1-D input, [B, T] for
        a batch. Each sequence is one prefill from an empty state (src/model/routing.h)."""
        ids, single = as_batch(input_ids, "input_ids")
        rows = [self._m.routing_analysis(r.tolist()) for r in ids]
        if single:
            return rows[0]
        out = {"mode": rows[0]["mode"], "layers": []}
        out["average_usage"] = {k: float(np.mean([r["average_usage"][k] for r in rows]))
                                for k in ("mamba", "attention")}
        for i, layer in enumerate(rows[0]["layers"]):
            out["layers"].append({
                "layer": layer["layer"],
                "usage": {k: float(np.mean([r["layers"][i]["usage"][k] for r in rows]))
                          for k in ("mamba", "attention")},
                "attention_share": np.stack([r["layers"][i]["attention_share"] for r in rows]),
                "p": np.stack([r["layers"][i]["p"] for r in rows]),
                "route": [r["layers"][i]["route"] for r in rows],
            })
        return out

    # --- training and evaluation ------------------------------------------------------------
    def fit(self, tokens, targets=None, *, steps=100, batch_size=8, seq_len=128, lr=1e-3,
            warmup=None, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0, seed=0, callback=None):
        """Trains in place on token arrays with the engine's loss and gradients (its fast float
        path) and AdamW with warmup + cosine decay (the trainer's schedule, lr_at).

        tokens: a 1-D token stream (each step draws batch_size windows of seq_len + 1 tokens at
        random offsets, the next token as target), or 2-D [N, L] rows with targets [N, L] (-1:
        not scored), e.g. tasks.examples(); each step draws batch_size rows. Draws come from
        NumPy's PCG64(seed). callback(step, steps, loss) after each step; returning False
        stops. Returns the history: a list of dicts (step, lr, loss, grad_norm). For corpus
        training with checkpoints and exact resume, use Trainer (hm train's loop)."""
        data = as_ids(tokens, "tokens")
        tgt = None if targets is None else as_ids(targets, "targets", lowest=-1)
        if tgt is None and data.ndim != 1:
            raise ValueError(f"tokens must be a 1-D stream, or 2-D rows with targets; got shape {data.shape} "
                             "without targets")
        if tgt is not None and (data.ndim != 2 or tgt.shape != data.shape):
            raise ValueError(f"tokens and targets must both be 2-D [N, L] of one shape, got {data.shape} and "
                             f"{tgt.shape}")
        if tgt is None and len(data) < seq_len + 1:
            raise ValueError(f"tokens holds {len(data)} ids, fewer than seq_len + 1 = {seq_len + 1}")
        for n, v in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len)):
            if int(v) < 1:
                raise ValueError(f"{n} must be >= 1, got {v}")
        steps = int(steps)
        warmup = min(100, steps // 10) if warmup is None else int(warmup)
        cfg = _core.AdamWConfig()
        cfg.lr, cfg.weight_decay, cfg.clip_norm = float(lr), float(weight_decay), float(clip_norm)
        opt = _core.Optimizer(self._m, cfg)
        rng = np.random.Generator(np.random.PCG64(seed))
        history = []
        for step in range(steps):
            if tgt is None:
                starts = rng.integers(0, len(data) - seq_len, size=batch_size)
                win = np.stack([data[s:s + seq_len + 1] for s in starts])
                x, y = np.ascontiguousarray(win[:, :-1]), np.ascontiguousarray(win[:, 1:])
            else:
                rows = rng.integers(0, len(data), size=batch_size)
                x, y = data[rows], tgt[rows]
            step_lr = _core.lr_at(step, warmup, steps, float(lr), float(lr) * float(min_lr_ratio))
            loss, norm = opt.step(x, y, step_lr)
            history.append({"step": step + 1, "lr": step_lr, "loss": loss, "grad_norm": norm})
            if callback is not None and callback(step + 1, steps, loss) is False:
                break
        return history

    def evaluate_task(self, task, n=1000, batch=16, **task_fields):
        """Accuracy and loss of this model on test draws 0..n-1 of a recall task (as hm eval
        --task; the same test set for every model). task: a name ("mqar", "copy", "induction")
        or a TaskSpec; task_fields: vocab, seq_len, kv."""
        from .tasks import task_spec
        spec = task_spec(task, **task_fields)
        return self._m.score_task(spec, int(n), int(batch))

    def __repr__(self):
        c = self.config
        return (f"HybridMambaModel(hybrid={c.hybrid!r}, d_model={c.d_model}, n_layers={c.n_layers}, "
                f"vocab_size={c.vocab_size}, parameters={self.num_parameters()}, device={self.device!r})")


def _without_type(d):
    d.pop("model_type", None)
    return d
