#!/usr/bin/env python3
"""PyTorch peer and oracle for hybrid-mamba (docs/MODEL.md; True Hybrid models: docs/TRUE_HYBRID.md).

Subcommands:
  golden        write reference logits (full forward, token-by-token decode, split prefill)
  bench         time full-forward prefill and cached greedy decoding; one JSON object on stdout
  logits        print the last-position logits of a token list (debugging aid)
  write-random  write a random checkpoint for a config (development and tests)
  grads         loss and every parameter's gradient in float64 on random tokens (training oracle)
  train-bench   time float32 training steps (forward, loss, backward, AdamW); one JSON object

True Hybrid layers: the router (analyzer features detached) runs batched; then, since each
sequence routes its own way, each sequence runs its paths on its compacted subsequences (Mamba on
M's tokens, attention on u + exchange * x over A's tokens, RoPE at the rank within A), fused with
the gates. Decoding keeps, per sequence and true layer, the conv/SSM state, the K/V rows of the
attention tokens only, the analyzer's EMA, the last Mamba output and the chunk logit (as the C++).
Training (grads, train-bench) adds the budget loss to the objective; the loss reported is the
cross-entropy.

Run with Debian's interpreter: /usr/bin/python3 bench/torch_peer.py ...
Exit codes: 0 success, 1 internal self-check failure, 2 bad input.
"""

import argparse
import json
import math
import os
import statistics
import struct
import sys
import time

# libgomp reads this at load time, so it must precede `import torch`. Debian's torch runs its OpenMP
# pool beside OpenBLAS's pthread pool; with the default spin-waiting, idle OpenMP workers starve
# the BLAS threads (measured: --threads 2 was 3-15x slower than --threads 1 on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class PeerError(Exception):
    """Bad input: reported as `torch_peer: <message>` with exit code 2."""


# ----------------------------------------------------------------------------- safetensors

_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
_NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I32": "<i4", "I64": "<i8",
                 "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
_HEADER_LIMIT = 100_000_000


def read_safetensors(path):
    """Returns {name: float32 or integer torch.Tensor}, validating the file like the reference."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PeerError(f"cannot read {path}: {e.strerror}")
    if len(data) < 8:
        raise PeerError(f"{path}: file too short for a safetensors header ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _HEADER_LIMIT:
        raise PeerError(f"{path}: header length {n} exceeds {_HEADER_LIMIT}")
    if 8 + n > len(data):
        raise PeerError(f"{path}: header length {n} runs past the end of the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PeerError(f"{path}: header is not valid JSON: {e}")
    if not isinstance(header, dict):
        raise PeerError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and (not isinstance(meta, dict)
                             or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise PeerError(f"{path}: __metadata__ must map strings to strings")
    buf_start, buf_len = 8 + n, len(data) - 8 - n

    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise PeerError(f"{path}: tensor '{name}' needs dtype, shape and data_offsets")
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dt not in _DTYPE_SIZES:
            raise PeerError(f"{path}: tensor '{name}' has unknown dtype {dt!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise PeerError(f"{path}: tensor '{name}' has a bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise PeerError(f"{path}: tensor '{name}' has bad data_offsets {offs!r}")
        if offs[1] - offs[0] != math.prod(shape) * _DTYPE_SIZES[dt]:
            raise PeerError(f"{path}: tensor '{name}' ({dt} {shape}) spans {offs[1] - offs[0]} bytes, "
                            f"expected {math.prod(shape) * _DTYPE_SIZES[dt]}")
        spans.append((offs[0], offs[1], name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap at byte {pos}"
            raise PeerError(f"{path}: tensor '{name}' {what}")
        pos = end
    if pos != buf_len:
        raise PeerError(f"{path}: tensors cover {pos} bytes but the data buffer holds {buf_len}")

    out = {}
    for name, info in header.items():
        dt, shape = info["dtype"], info["shape"]
        begin, end = info["data_offsets"]
        count = math.prod(shape)
        if dt == "BF16":
            raw = np.frombuffer(data, dtype="<u2", count=count, offset=buf_start + begin)
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        elif dt in _NUMPY_DTYPES:
            arr = np.frombuffer(data, dtype=_NUMPY_DTYPES[dt], count=count, offset=buf_start + begin)
            arr = arr.astype(np.float32) if dt in ("F16", "F64") else arr.copy()
        else:
            raise PeerError(f"{path}: tensor '{name}' has dtype {dt}, which this reader does not load")
        out[name] = torch.from_numpy(np.ascontiguousarray(arr).reshape(shape))
    return out


def _bf16_bits(a):
    # Round to nearest even, as torch's float->bfloat16 conversion does.
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype("<u2")


def write_safetensors(path, tensors, dtypes=None):
    """tensors: {name: torch.Tensor}; float tensors go out as F32 unless dtypes names F16/BF16/F64."""
    dtypes = dtypes or {}
    blobs, header, offset = [], {}, 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        if t.dtype == torch.int32:
            dt, raw = "I32", t.numpy().astype("<i4").tobytes()
        elif t.dtype.is_floating_point:
            dt = dtypes.get(name, "F32")
            a = t.to(torch.float32).numpy()
            if dt == "F64":
                raw = t.to(torch.float64).numpy().astype("<f8").tobytes()
            elif dt == "F32":
                raw = a.astype("<f4").tobytes()
            elif dt == "F16":
                raw = a.astype("<f2").tobytes()
            elif dt == "BF16":
                raw = _bf16_bits(a).tobytes()
            else:
                raise PeerError(f"writer does not support dtype {dt}")
        else:
            raise PeerError(f"writer does not support tensor '{name}' of {t.dtype}")
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # 8-byte aligned data buffer
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)
    os.replace(tmp, path)  # readers never see a half-written file


# ----------------------------------------------------------------------------- config

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_CONFIG_FIELDS = {
    "model_type": ("\"hybrid-mamba\"", lambda v: v == "hybrid-mamba"),
    "hybrid": ("\"simple\" or \"true\"", lambda v: v in ("simple", "true")),
    "d_model": ("an int > 0", lambda v: _is_int(v) and v > 0),
    "n_layers": ("an int > 0", lambda v: _is_int(v) and v > 0),
    "attention_layers": ("a list of ints", lambda v: isinstance(v, list) and all(_is_int(x) for x in v)),
    "vocab_size": ("an int > 0", lambda v: _is_int(v) and v > 0),
    "d_state": ("an int > 0", lambda v: _is_int(v) and v > 0),
    "d_conv": ("an int > 0", lambda v: _is_int(v) and v > 0),
    "expand": ("an int > 0", lambda v: _is_int(v) and v > 0),
    "dt_rank": ("\"auto\" or an int > 0", lambda v: v == "auto" or (_is_int(v) and v > 0)),
    "n_heads": ("an int > 0", lambda v: _is_int(v) and v > 0),
    "n_kv_heads": ("an int > 0", lambda v: _is_int(v) and v > 0),
    "rope": ("a bool", lambda v: isinstance(v, bool)),
    "rope_theta": ("a number > 0", lambda v: _is_num(v) and v > 0),
    "d_ff": ("an int >= 0", lambda v: _is_int(v) and v >= 0),
    "norm_eps": ("a number > 0", lambda v: _is_num(v) and v > 0),
    "tie_embeddings": ("a bool", lambda v: isinstance(v, bool)),
    "state_bridges": ("a bool", lambda v: isinstance(v, bool)),
}

# True Hybrid fields (docs/TRUE_HYBRID.md): optional, with the doc's defaults; true_layers is
# required (non-empty) with "hybrid": "true" and must be empty otherwise.
_TRUE_FIELDS = {
    "true_layers": ("a list of ints", lambda v: isinstance(v, list) and all(_is_int(x) for x in v), []),
    "routing_mode": ("\"both\", \"soft\" or \"hard\"", lambda v: v in ("both", "soft", "hard"), "soft"),
    "routing_granularity": ("\"token\" or \"chunk\"", lambda v: v in ("token", "chunk"), "token"),
    "routing_chunk": ("an int > 0", lambda v: _is_int(v) and v > 0, 16),
    "attention_budget": ("a number in (0, 1)", lambda v: _is_num(v) and 0 < v < 1, 0.5),
    "budget_loss_weight": ("a number >= 0", lambda v: _is_num(v) and v >= 0, 0.1),
}
EMA_DECAY = 0.875  # the analyzer's EMA of u (src/model/true_hybrid.h kEmaDecay)


class Config:
    def __init__(self, raw, where="config"):
        if not isinstance(raw, dict):
            raise PeerError(f"{where}: expected a JSON object")
        for key in raw:
            if key not in _CONFIG_FIELDS and key not in _TRUE_FIELDS:
                raise PeerError(f"{where}: unknown field '{key}'")
        for key, (want, ok) in _CONFIG_FIELDS.items():
            if key not in raw:
                raise PeerError(f"{where}: missing field '{key}'")
            if not ok(raw[key]):
                raise PeerError(f"{where}: field '{key}' must be {want}, got {json.dumps(raw[key])}")
        for key, (want, ok, default) in _TRUE_FIELDS.items():
            if key in raw and not ok(raw[key]):
                raise PeerError(f"{where}: field '{key}' must be {want}, got {json.dumps(raw[key])}")
        self.raw = dict(raw)
        for key in _CONFIG_FIELDS:
            setattr(self, key, raw[key])
        for key, (_, _, default) in _TRUE_FIELDS.items():
            setattr(self, key, raw.get(key, default))
        self.attention_budget = float(self.attention_budget)
        self.budget_loss_weight = float(self.budget_loss_weight)
        self.rope_theta = float(self.rope_theta)
        self.norm_eps = float(self.norm_eps)
        if self.dt_rank == "auto":
            self.dt_rank = -(-self.d_model // 16)
        self.d_inner = self.expand * self.d_model
        for i in self.attention_layers:
            if not 0 <= i < self.n_layers:
                raise PeerError(f"{where}: field 'attention_layers' has index {i} outside 0..{self.n_layers - 1}")
        if len(set(self.attention_layers)) != len(self.attention_layers):
            raise PeerError(f"{where}: field 'attention_layers' repeats an index")
        for i in self.true_layers:
            if not 0 <= i < self.n_layers:
                raise PeerError(f"{where}: field 'true_layers' has index {i} outside 0..{self.n_layers - 1}")
            if i in self.attention_layers:
                raise PeerError(f"{where}: layer {i} is in both 'attention_layers' and 'true_layers' "
                                f"(a true-hybrid layer already holds an attention path)")
        if len(set(self.true_layers)) != len(self.true_layers):
            raise PeerError(f"{where}: field 'true_layers' repeats an index")
        if self.hybrid == "true" and not self.true_layers:
            raise PeerError(f"{where}: \"hybrid\": \"true\" needs at least one layer in 'true_layers'")
        if self.hybrid == "simple" and self.true_layers:
            raise PeerError(f"{where}: field 'true_layers' needs \"hybrid\": \"true\"")
        if self.d_model % self.n_heads:
            raise PeerError(f"{where}: field 'n_heads' ({self.n_heads}) must divide d_model ({self.d_model})")
        if self.n_heads % self.n_kv_heads:
            raise PeerError(f"{where}: field 'n_kv_heads' ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        self.head_dim = self.d_model // self.n_heads
        if self.rope and self.head_dim % 2:
            raise PeerError(f"{where}: field 'rope' needs an even head_dim, got {self.head_dim}")
        self.is_attn = [i in set(self.attention_layers) for i in range(self.n_layers)]  # attention only
        self.is_true = [i in set(self.true_layers) for i in range(self.n_layers)]      # both paths
        self.has_mamba = [not a for a in self.is_attn]
        self.has_attn = [a or t for a, t in zip(self.is_attn, self.is_true)]

    def has_bridge(self, i):
        # No bridge next to a true-hybrid layer: it holds both types itself.
        return (self.state_bridges and i > 0 and not self.is_true[i] and not self.is_true[i - 1]
                and self.is_attn[i] != self.is_attn[i - 1])

    def inner_width(self, i):
        return self.n_heads * self.head_dim if self.is_attn[i] else self.d_inner


def read_json(path):
    """The JSON value in a file, or a PeerError naming the file."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise PeerError(f"cannot read {path}: {e.strerror}")
    except json.JSONDecodeError as e:
        raise PeerError(f"{path}: not valid JSON: {e}")


def load_config(path):
    return Config(read_json(path), where=path)


def expected_shapes(cfg):
    """Every tensor the checkpoint must hold, in MODEL.md order."""
    D, E, N, K, R = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.d_conv, cfg.dt_rank
    H, G, h, Ff, V = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    s = {"backbone.embeddings.weight": [V, D]}
    for i in range(cfg.n_layers):
        p = f"backbone.layers.{i}."
        s[p + "norm.weight"] = [D]
        if cfg.has_attn[i]:
            s[p + "mixer.q_proj.weight"] = [H * h, D]
            s[p + "mixer.k_proj.weight"] = [G * h, D]
            s[p + "mixer.v_proj.weight"] = [G * h, D]
            s[p + "mixer.o_proj.weight"] = [D, H * h]
        if cfg.has_mamba[i]:
            s[p + "mixer.in_proj.weight"] = [2 * E, D]
            s[p + "mixer.conv1d.weight"] = [E, 1, K]
            s[p + "mixer.conv1d.bias"] = [E]
            s[p + "mixer.x_proj.weight"] = [R + 2 * N, E]
            s[p + "mixer.dt_proj.weight"] = [E, R]
            s[p + "mixer.dt_proj.bias"] = [E]
            s[p + "mixer.A_log"] = [E, N]
            s[p + "mixer.D"] = [E]
            s[p + "mixer.out_proj.weight"] = [D, E]
        if cfg.is_true[i]:  # fusion, cross-path exchange and router (docs/TRUE_HYBRID.md)
            s[p + "mixer.fuse_mamba"] = [D]
            s[p + "mixer.fuse_attn"] = [D]
            s[p + "mixer.exchange"] = [D]
            s[p + "mixer.router.weight"] = [D]
            s[p + "mixer.router.feat_weight"] = [2]
            s[p + "mixer.router.bias"] = [1]
        if Ff > 0:
            s[p + "mlp_norm.weight"] = [D]
            s[p + "mlp.gate_proj.weight"] = [Ff, D]
            s[p + "mlp.up_proj.weight"] = [Ff, D]
            s[p + "mlp.down_proj.weight"] = [D, Ff]
    for i in range(cfg.n_layers):
        if cfg.has_bridge(i):
            S = cfg.inner_width(i - 1)
            s[f"backbone.bridges.{i}.norm.weight"] = [S]
            s[f"backbone.bridges.{i}.proj.weight"] = [D, S]
            s[f"backbone.bridges.{i}.gate"] = [D]
    s["backbone.norm_f.weight"] = [D]
    if not cfg.tie_embeddings:
        s["lm_head.weight"] = [V, D]
    return s


def _name_list(names, limit=6):
    names = sorted(names)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_tensors(cfg, tensors, where):
    want = expected_shapes(cfg)
    missing = want.keys() - tensors.keys()
    extra = tensors.keys() - want.keys()
    if missing:
        raise PeerError(f"{where}: missing tensors: {_name_list(missing)}")
    if extra:
        raise PeerError(f"{where}: unexpected tensors: {_name_list(extra)}")
    for name, shape in want.items():
        t = tensors[name]
        if list(t.shape) != shape:
            raise PeerError(f"{where}: tensor '{name}' has shape {list(t.shape)}, expected {shape}")
        if not t.dtype.is_floating_point:
            raise PeerError(f"{where}: tensor '{name}' is {t.dtype}, expected a float type")


# ----------------------------------------------------------------------------- model

def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class _Layer:
    pass


class _RouteState:
    """Decoding state of one true-hybrid layer for one sequence (docs/TRUE_HYBRID.md, "What skipping
    means"): the Mamba path's conv window and SSM state, the attention path's K/V rows (only the
    tokens routed there, so their count is this layer's own), the analyzer's EMA m, the last Mamba
    output x (for the exchange) and the current chunk's logit."""

    def __init__(self, cfg, dtype):
        G, hd, D = cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        self.conv = torch.zeros(1, cfg.d_inner, cfg.d_conv - 1, dtype=dtype)
        self.ssm = torch.zeros(1, cfg.d_inner, cfg.d_state, dtype=dtype)
        self.k = torch.zeros(1, G, 0, hd, dtype=dtype)
        self.v = torch.zeros(1, G, 0, hd, dtype=dtype)
        self.x = torch.zeros(D, dtype=dtype)


class Cache:
    """Decoding state for a batch: Mamba conv/ssm states, attention K/V, tokens seen so far; for a
    true-hybrid layer, one _RouteState per sequence (its paths see per-sequence subsequences) and
    the analyzer's EMA and chunk logit for the batch."""

    def __init__(self, model, batch):
        cfg = model.cfg
        dt = model.dtype
        self.batch = batch
        self.pos = 0
        self.conv = [None] * cfg.n_layers  # Mamba: [B, E, K-1], last pre-conv inputs
        self.ssm = [None] * cfg.n_layers   # Mamba: [B, E, N]
        self.k = [None] * cfg.n_layers     # attention: [B, G, pos, h], after RoPE
        self.v = [None] * cfg.n_layers
        self.seq = [None] * cfg.n_layers   # true hybrid: [_RouteState] * B
        self.ema = [None] * cfg.n_layers   # true hybrid: [B, D], m_{pos-1}
        self.chunk = [None] * cfg.n_layers  # true hybrid: [B], logit of the chunk of pos-1
        for i in range(cfg.n_layers):
            if cfg.is_true[i]:
                self.seq[i] = [_RouteState(cfg, dt) for _ in range(batch)]
                self.ema[i] = torch.zeros(batch, cfg.d_model, dtype=dt)
                self.chunk[i] = torch.zeros(batch, dtype=dt)
            elif cfg.is_attn[i]:
                self.k[i] = torch.zeros(batch, cfg.n_kv_heads, 0, cfg.head_dim, dtype=dt)
                self.v[i] = torch.zeros(batch, cfg.n_kv_heads, 0, cfg.head_dim, dtype=dt)
            else:
                self.conv[i] = torch.zeros(batch, cfg.d_inner, cfg.d_conv - 1, dtype=dt)
                self.ssm[i] = torch.zeros(batch, cfg.d_inner, cfg.d_state, dtype=dt)


class HybridMamba:
    def __init__(self, cfg, tensors, where="model", dtype=torch.float32):
        """dtype float64 with leaf tensors that require grad: a differentiable double-precision
        model (grads); the weights are used as given, so gradients reach those leaves."""
        check_tensors(cfg, tensors, where)
        self.cfg = cfg
        self.dtype = dtype
        self.mode = cfg.routing_mode
        w = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
        self.emb = w["backbone.embeddings.weight"]
        self.norm_f = w["backbone.norm_f.weight"]
        self.head = self.emb if cfg.tie_embeddings else w["lm_head.weight"]
        self.layers = []
        self.p_means = []  # true-hybrid layers' mean_t p_t per sequence [B], from the last _run
        self.route_logits = []  # and their routing logits r [B, T] (detached)
        for i in range(cfg.n_layers):
            p = f"backbone.layers.{i}."
            m = p + "mixer."
            L = _Layer()
            L.norm = w[p + "norm.weight"]
            if cfg.has_attn[i]:
                L.q, L.k, L.v, L.o = (w[m + f"{n}_proj.weight"] for n in "qkvo")
            if cfg.has_mamba[i]:
                L.in_proj = w[m + "in_proj.weight"]
                L.conv_w = w[m + "conv1d.weight"]           # [E, 1, K] for F.conv1d
                L.conv_w2 = L.conv_w[:, 0, :].contiguous()  # [E, K] for the decode step
                L.conv_b = w[m + "conv1d.bias"]
                L.x_proj = w[m + "x_proj.weight"]
                L.dt_w = w[m + "dt_proj.weight"]
                L.dt_b = w[m + "dt_proj.bias"]
                L.A = -torch.exp(w[m + "A_log"])
                L.D = w[m + "D"]
                L.out_proj = w[m + "out_proj.weight"]
            if cfg.is_true[i]:
                L.fuse_m, L.fuse_a, L.exchange = w[m + "fuse_mamba"], w[m + "fuse_attn"], w[m + "exchange"]
                L.router_w, L.router_fw, L.router_b = (w[m + "router.weight"], w[m + "router.feat_weight"],
                                                       w[m + "router.bias"])
            if cfg.d_ff > 0:
                L.mlp_norm = w[p + "mlp_norm.weight"]
                L.gate, L.up, L.down = (w[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
            L.bridge = None
            if cfg.has_bridge(i):
                b = f"backbone.bridges.{i}."
                L.bridge = (w[b + "norm.weight"], w[b + "proj.weight"], w[b + "gate"])
            self.layers.append(L)

    @classmethod
    def load(cls, model_dir):
        if not os.path.isdir(model_dir):
            raise PeerError(f"model directory {model_dir} does not exist")
        cfg = load_config(os.path.join(model_dir, "config.json"))
        path = os.path.join(model_dir, "model.safetensors")
        return cls(cfg, read_safetensors(path), where=path)

    def new_cache(self, batch):
        return Cache(self, batch)

    # --- public entry points

    def forward(self, tokens):
        """Full forward from an empty state: tokens [B, L] -> logits [B, L, V]."""
        return self._run(tokens, None, last_only=False)

    def prefill(self, tokens, cache, last_only=False):
        """Feeds a chunk [B, T] through the cache; logits [B, T, V] or [B, V] when last_only."""
        return self._run(tokens, cache, last_only)

    def step(self, token, cache):
        """Feeds one token per sequence [B] through the cache; logits [B, V]."""
        return self._run(token.reshape(-1, 1), cache, last_only=True, single=True)

    def budget_loss(self):
        """Per-sequence budget loss [B] of the last forward: sum over true layers of
        budget_loss_weight * (mean_t p_t - attention_budget)^2 (none in "both" mode)."""
        cfg = self.cfg
        if not self.p_means or self.mode == "both":
            return None
        return sum(cfg.budget_loss_weight * (pm - cfg.attention_budget) ** 2 for pm in self.p_means)

    # --- internals

    def _check_tokens(self, tokens, cache):
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise PeerError(f"tokens must be [batch, len>0], got {list(tokens.shape)}")
        if cache is not None and tokens.shape[0] != cache.batch:
            raise PeerError(f"token batch {tokens.shape[0]} does not match cache batch {cache.batch}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise PeerError(f"token id {bad} outside [0, {self.cfg.vocab_size})")

    def _rope_tables(self, pos0, T):
        # Angles in float64, rounded once: the oracle should not carry float32 angle error at large positions.
        h = self.cfg.head_dim
        inv_freq = self.cfg.rope_theta ** (-torch.arange(0, h // 2, dtype=torch.float64) * 2.0 / h)
        ang = torch.arange(pos0, pos0 + T, dtype=torch.float64)[:, None] * inv_freq[None, :]
        return torch.cos(ang).to(self.dtype), torch.sin(ang).to(self.dtype)  # [T, h/2]

    def _attn_ctx(self, ctx, pos0, T):
        """RoPE tables and causal mask for T queries at positions pos0.. (memoized per forward:
        plain attention layers share one; a true layer's compacted paths have their own)."""
        key = (pos0, T)
        if key not in ctx:
            c = {}
            if self.cfg.rope:
                c["cos"], c["sin"] = self._rope_tables(pos0, T)
            if T > 1:
                # Query at position pos0+t sees keys 0..pos0+t.
                c["mask"] = torch.arange(pos0 + T)[None, :] > torch.arange(pos0, pos0 + T)[:, None]
            ctx[key] = c
        return ctx[key]

    def _run(self, tokens, cache, last_only, single=False):
        cfg = self.cfg
        self._check_tokens(tokens, cache)
        B, T = tokens.shape
        pos0 = cache.pos if cache is not None else 0
        ctx = {}
        self.p_means, self.route_logits = [], []
        h = F.embedding(tokens, self.emb)  # [B, T, D]
        src = None
        for i, L in enumerate(self.layers):
            if L.bridge is not None:
                bn, bp, bg = L.bridge
                h = h + bg * F.linear(rmsnorm(src, bn, cfg.norm_eps), bp)
            u = rmsnorm(h, L.norm, cfg.norm_eps)
            if cfg.is_true[i]:
                out, inner = self._true_layer(i, L, u, cache, pos0, ctx), None
            elif cfg.is_attn[i]:
                kv = (cache.k[i], cache.v[i]) if cache is not None else None
                out, inner, kv = self._attention(L, u, kv, self._attn_ctx(ctx, pos0, T))
                if cache is not None:
                    cache.k[i], cache.v[i] = kv
            else:
                st = (cache.conv[i], cache.ssm[i]) if cache is not None else None
                mixer = self._mamba_step if single else self._mamba
                out, inner, st = mixer(L, u, st)
                if cache is not None:
                    cache.conv[i], cache.ssm[i] = st
            h = h + out
            if cfg.d_ff > 0:
                m = rmsnorm(h, L.mlp_norm, cfg.norm_eps)
                h = h + F.linear(F.silu(F.linear(m, L.gate)) * F.linear(m, L.up), L.down)
            src = inner
        if cache is not None:
            cache.pos += T
        if last_only:
            h = h[:, -1]
        return F.linear(rmsnorm(h, self.norm_f, cfg.norm_eps), self.head)

    def _router(self, i, L, u, cache, pos0):
        """Routing logits r [B, T] of a true layer (docs/TRUE_HYBRID.md; src/model/true_hybrid.h).
        The analyzer's features are measurements of u without gradient; s gets its gradient
        through router.weight . u and the router's weights."""
        cfg = self.cfg
        B, T, D = u.shape
        with torch.no_grad():
            ud = u.detach()
            m = cache.ema[i] if cache is not None else ud.new_zeros(B, D)
            prev = []  # m_{t-1} for each t: the EMA is a sequential recurrence, like the scan
            for u_t in ud.unbind(1):
                prev.append(m)
                m = EMA_DECAY * m + (1.0 - EMA_DECAY) * u_t
            if cache is not None:
                cache.ema[i] = m
            prev = torch.stack(prev, dim=1)                                      # [B, T, D]
            denom = ud.norm(dim=-1) * prev.norm(dim=-1)
            cos = torch.where(denom > 0, (ud * prev).sum(-1) / denom.clamp(min=torch.finfo(u.dtype).tiny), 0.0)
            novelty = 1.0 - cos
            position = (torch.log2(torch.arange(pos0, pos0 + T, dtype=torch.float64) + 1.0) / 16.0).to(u.dtype)
            feats = torch.stack([novelty, position.expand(B, T)], dim=-1)        # [B, T, 2]
        s = u @ L.router_w + feats @ L.router_fw + L.router_b                    # [B, T]
        if cfg.routing_granularity == "chunk":
            # Every token takes the logit of its chunk's first token; a chunk that began in an
            # earlier call supplies its logit from the cache (index -1 below).
            t = torch.arange(T)
            first = t - (pos0 + t) % cfg.routing_chunk                            # may be < 0
            carried = cache.chunk[i] if cache is not None else s.new_zeros(B)
            s = torch.cat([carried[:, None], s], dim=1)[:, first.clamp(min=-1) + 1]
        if cache is not None:
            cache.chunk[i] = s[:, -1].detach()
        self.route_logits.append(s.detach())
        return s

    def _true_layer(self, i, L, u, cache, pos0, ctx):
        """The mixer of a true-hybrid layer: router, then each path on its own subsequence, fused."""
        B, T, D = u.shape
        r = self._router(i, L, u, cache, pos0)
        p = torch.sigmoid(r)
        self.p_means.append(p.mean(dim=1))
        ones = torch.ones_like(p)
        if self.mode == "both":
            to_attn, to_mamba, gm, ga = ones.bool(), ones.bool(), ones, ones
        elif self.mode == "soft":
            to_attn, to_mamba, gm, ga = ones.bool(), ones.bool(), 1.0 - p, p
        else:  # hard: only the chosen path runs, its output scaled by its gate
            to_attn = r > 0
            to_mamba = ~to_attn
            gm, ga = 1.0 - p, p
        # Each sequence routes differently, so each runs its paths on its own compacted sequence.
        outs = []
        for b in range(B):
            st = cache.seq[i][b] if cache is not None else _RouteState(self.cfg, u.dtype)
            ub = u[b]
            out = torch.zeros_like(ub)
            mi = to_mamba[b].nonzero().squeeze(1)
            ai = to_attn[b].nonzero().squeeze(1)
            ym = None
            if len(mi) > 0:  # Mamba over M's tokens only: conv window and SSM state skip the others
                mixer = self._mamba_step if len(mi) == 1 and cache is not None else self._mamba
                ym, _, (conv, ssm) = mixer(L, ub[mi][None], (st.conv, st.ssm))
                ym = ym[0]                                                        # [|M|, D]
                out = out.index_add(0, mi, gm[b, mi, None] * L.fuse_m * ym)
            if len(ai) > 0:
                # Exchange: x_t = the Mamba output at the latest Mamba token <= t, else the carried one.
                latest = to_mamba[b].long().cumsum(0)[ai] - 1                    # -1: none in this call
                xs = st.x[None] if ym is None else torch.cat([st.x[None], ym], dim=0)
                va = ub[ai] + L.exchange * xs[latest + 1]
                # Attention over A's tokens only: RoPE at the rank within A, K/V of A's tokens only.
                n_kv = st.k.shape[2]
                ya, _, (k, v) = self._attention(L, va[None], (st.k, st.v) if cache is not None else None,
                                                self._attn_ctx(ctx, n_kv, len(ai)))
                out = out.index_add(0, ai, ga[b, ai, None] * L.fuse_a * ya[0])
                if cache is not None:
                    st.k, st.v = k, v
            if cache is not None and ym is not None:
                st.conv, st.ssm, st.x = conv, ssm, ym[-1]
            outs.append(out)
        return torch.stack(outs)

    def _mamba(self, L, u, state=None):
        """u [B, T, D] continuing state (conv [B, E, K-1], ssm [B, E, N]) or from zeros;
        returns (out [B, T, D], inner [B, T, E], new state)."""
        cfg = self.cfg
        B, T, _ = u.shape
        E, K, N, R = cfg.d_inner, cfg.d_conv, cfg.d_state, cfg.dt_rank
        xz = F.linear(u, L.in_proj)
        x, z = xz[..., :E], xz[..., E:]
        prev, s = state if state is not None else (u.new_zeros(B, E, K - 1), u.new_zeros(B, E, N))
        # Prepending the carried inputs makes a chunk after a prefix see exactly what the full scan sees.
        xc = torch.cat([prev, x.transpose(1, 2)], dim=2)  # [B, E, K-1+T]
        conv_state = xc[:, :, T:]
        x = F.silu(F.conv1d(xc, L.conv_w, L.conv_b, groups=E)).transpose(1, 2)  # [B, T, E]
        dbc = F.linear(x, L.x_proj)
        dt_r, Bm, Cm = dbc[..., :R], dbc[..., R:R + N], dbc[..., R + N:]
        delta = F.softplus(F.linear(dt_r, L.dt_w, L.dt_b))      # [B, T, E]
        dA = torch.exp(delta.unsqueeze(-1) * L.A)                # [B, T, E, N]
        dBx = (delta * x).unsqueeze(-1) * Bm.unsqueeze(2)        # [B, T, E, N]
        Cm = Cm.unsqueeze(-1)                                    # [B, T, N, 1]
        # unbind, not dA[:, t]: under autograd each indexing op's backward fills a zero gradient
        # of the whole [B, T, E, N] tensor, which makes the backward O(T^2) (measured on demo,
        # B 8, L 128: 12-15 s per training step against ~1 s); unbind's backward stacks once.
        dA_t, dBx_t, C_t = dA.unbind(1), dBx.unbind(1), Cm.unbind(1)
        ys = []
        for t in range(T):
            s = dA_t[t] * s + dBx_t[t]
            ys.append(torch.matmul(s, C_t[t]))                   # [B, E, 1]
        y = torch.cat(ys, dim=2).transpose(1, 2) + x * L.D       # [B, T, E]
        inner = y * F.silu(z)
        return F.linear(inner, L.out_proj), inner, (conv_state, s)

    def _mamba_step(self, L, u, state):
        """One token per sequence, u [B, 1, D], from the cached state."""
        cfg = self.cfg
        E, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        conv, ssm = state
        u = u[:, 0]                                              # [B, D]
        xz = F.linear(u, L.in_proj)
        x, z = xz[:, :E], xz[:, E:]
        win = torch.cat([conv, x.unsqueeze(-1)], dim=2)          # [B, E, K]
        x = F.silu((win * L.conv_w2).sum(-1) + L.conv_b)         # [B, E]
        dbc = F.linear(x, L.x_proj)
        dt_r, Bm, Cm = dbc[:, :R], dbc[:, R:R + N], dbc[:, R + N:]
        delta = F.softplus(F.linear(dt_r, L.dt_w, L.dt_b))      # [B, E]
        s = torch.exp(delta.unsqueeze(-1) * L.A) * ssm + (delta * x).unsqueeze(-1) * Bm.unsqueeze(1)
        y = torch.matmul(s, Cm.unsqueeze(-1)).squeeze(-1) + x * L.D
        inner = (y * F.silu(z)).unsqueeze(1)                     # [B, 1, E]
        return F.linear(inner, L.out_proj), inner, (win[:, :, 1:], s)

    def _attention(self, L, u, kv, actx):
        """u [B, T, D] after the cached keys kv = (k, v) [B, G, S, hd] (None: from empty), with
        actx = _attn_ctx(ctx, S, T); returns (out, inner, (k, v) including these T tokens)."""
        cfg = self.cfg
        B, T, _ = u.shape
        H, G, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = F.linear(u, L.q).view(B, T, H, hd)
        k = F.linear(u, L.k).view(B, T, G, hd)
        v = F.linear(u, L.v).view(B, T, G, hd).transpose(1, 2)  # [B, G, T, hd]
        if cfg.rope:
            cos, sin = actx["cos"][None, :, None, :], actx["sin"][None, :, None, :]
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k = k.transpose(1, 2)
        if kv is not None:
            k = torch.cat([kv[0], k], dim=2)
            v = torch.cat([kv[1], v], dim=2)
        # GQA by grouping query heads: head j = g*rep + r uses kv head g = j // rep, no K/V copies.
        rep = H // G
        qg = q.transpose(1, 2).reshape(B, G, rep, T, hd)
        scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * (1.0 / math.sqrt(hd))  # [B,G,rep,T,S]
        if "mask" in actx:
            scores = scores.masked_fill(actx["mask"], float("-inf"))
        o = torch.matmul(torch.softmax(scores, dim=-1), v.unsqueeze(2))  # [B, G, rep, T, hd]
        inner = o.reshape(B, H, T, hd).transpose(1, 2).reshape(B, T, H * hd)
        return F.linear(inner, L.o), inner, (k, v)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ----------------------------------------------------------------------------- random checkpoints

def random_tensors(cfg, seed):
    """MODEL.md's initialization, except that every value init sets to a constant is drawn per
    channel and layer, so that a model mixing up layers or channels gives different logits: norm
    weights, bridge gates, A_log and D, and a true-hybrid layer's fusion scales, exchange and
    router feature weights and bias (inits 1, 0, log(n + 1), 1, 1, 0, 0, 0)."""
    g = torch.Generator().manual_seed(seed)

    def unif(shape, bound):
        return (torch.rand(shape, generator=g) * 2 - 1) * bound

    out_scale = 1.0 / math.sqrt(cfg.n_layers)
    t = {}
    for name, shape in expected_shapes(cfg).items():
        leaf = name.rsplit(".", 2)
        if name in ("backbone.embeddings.weight", "lm_head.weight"):
            v = torch.randn(shape, generator=g) * 0.02
        elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            v = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".gate"):
            v = unif(shape, 0.5)
        elif name.endswith("mixer.fuse_mamba") or name.endswith("mixer.fuse_attn"):
            v = 1.0 + 0.3 * torch.randn(shape, generator=g)  # init 1
        elif name.endswith("mixer.exchange"):
            v = unif(shape, 0.5)                             # init 0
        elif name.endswith("router.weight"):
            v = torch.randn(shape, generator=g) / math.sqrt(cfg.d_model)  # as initialized
        elif name.endswith("router.feat_weight"):
            v = torch.randn(shape, generator=g)              # init 0
        elif name.endswith("router.bias"):
            v = 0.2 * torch.randn(shape, generator=g)        # init 0
        elif name.endswith("conv1d.weight") or name.endswith("conv1d.bias"):
            v = unif(shape, 1.0 / math.sqrt(cfg.d_conv))
        elif name.endswith("A_log"):
            # init's log(n + 1), moved by up to +-1 per entry: every channel and layer its own A
            v = torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).expand(shape) + unif(shape, 1.0)
        elif name.endswith("mixer.D"):
            v = 0.5 + torch.rand(shape, generator=g)         # init 1
        elif name.endswith("dt_proj.weight"):
            v = unif(shape, cfg.dt_rank ** -0.5)
        elif name.endswith("dt_proj.bias"):
            dt = torch.exp(torch.rand(shape, generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
            dt = dt.clamp(min=1e-4)
            v = dt + torch.log(-torch.expm1(-dt))
        elif name.endswith(".weight") and len(shape) == 2:
            v = unif(shape, 1.0 / math.sqrt(shape[1]))
            if leaf[-2] in ("out_proj", "o_proj", "down_proj"):
                v = v * out_scale
        else:
            raise AssertionError(f"no init rule for {name}")
        t[name] = v.to(torch.float32)
    return t


# ----------------------------------------------------------------------------- commands

def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _objective(model, logits, targets):
    """(cross-entropy, training objective, budget term or None). The objective adds, for a
    true-hybrid model in soft or hard mode, each sequence's budget loss (model.budget_loss())
    weighted like its cross-entropy: by its counted positions / the batch's, as the C++ does;
    the reported loss stays the cross-entropy."""
    V = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
    budget = model.budget_loss()
    if budget is None:
        return ce, ce, None
    counted = (targets != -1).sum(dim=1).to(ce.dtype)
    aux = (counted / counted.sum() * budget).sum()
    return ce, ce + aux, aux


def cmd_golden(args):
    if args.batch < 1 or args.len < 1:
        raise PeerError("--batch and --len must be >= 1")
    model = HybridMamba.load(args.model)
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, V, (args.batch, args.len), generator=g, dtype=torch.int64)
    B, L = tokens.shape
    with torch.inference_mode():
        full = model.forward(tokens)
        route_logits = [r.clone() for r in model.route_logits]  # per true layer [B, L]

        cache = model.new_cache(B)
        steps = [model.prefill(tokens[:, :1], cache)[:, 0]]
        for t in range(1, L):
            steps.append(model.step(tokens[:, t], cache))
        decode = torch.stack(steps, dim=1)

        cache = model.new_cache(B)
        split = L // 2
        parts = [model.prefill(tokens[:, :split], cache)] if split > 0 else []
        for t in range(split, L):
            parts.append(model.step(tokens[:, t], cache).unsqueeze(1))
        prefill_split = torch.cat(parts, dim=1)

    out = {
        "tokens": tokens.to(torch.int32),
        "logits_full": full.contiguous(),
        "logits_decode": decode.contiguous(),
        "logits_prefill_split": prefill_split.contiguous(),
    }
    routes = ""
    if route_logits:
        # The routing logits of the full forward, [true layer, B, L]: the tests check that no hard
        # route hangs on a logit within rounding of 0 (min |r| is printed for that reason).
        r = torch.stack(route_logits)
        out["route_logits"] = r.contiguous()
        routes = (f"; {model.mode} routing, {model.cfg.routing_granularity}: attention share "
                  f"{float((r > 0).float().mean()):.3f}, min |route logit| {float(r.abs().min()):.3g}")
    write_safetensors(args.out, out)
    e_dec, e_split = _rel_err(decode, full), _rel_err(prefill_split, full)
    print(f"torch_peer: wrote {args.out}: B={B} L={L} V={V}; max |logit|={float(full.abs().max()):.4g}; "
          f"rel err vs full: decode {e_dec:.3g}, prefill_split {e_split:.3g}{routes}")
    # The three paths are independent computations of one function; disagreement is a peer bug.
    if max(e_dec, e_split) > 1e-4:
        print("torch_peer: self-check failed: cached paths disagree with the full forward", file=sys.stderr)
        return 1
    return 0


def _set_blas_threads(n):
    """Debian's torch calls the system BLAS (OpenBLAS, own thread pool), which torch.set_num_threads
    does not reach; without this, --threads 1 still multiplies on every core."""
    import ctypes
    for lib in ("libopenblas.so.0", "libopenblas.so"):
        try:
            ctypes.CDLL(lib).openblas_set_num_threads(n)
            return n
        except (OSError, AttributeError):
            continue
    return None


def _median_ms(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cmd_bench(args):
    for name in ("threads", "prefill_batch", "prefill_len", "decode_prompt", "decode_new", "reps"):
        if getattr(args, name) < 1:
            raise PeerError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise PeerError("--warmup must be >= 0")
    torch.set_num_threads(args.threads)
    blas_threads = _set_blas_threads(args.threads)
    model = HybridMamba.load(args.model)
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, V, (args.prefill_batch, args.prefill_len), generator=g)
    prompt = torch.randint(0, V, (1, args.decode_prompt), generator=g)

    with torch.inference_mode():
        prefill_ms = _median_ms(lambda: model.forward(batch), args.warmup, args.reps)
        prefill_last_ms = _median_ms(
            lambda: model.prefill(batch, model.new_cache(args.prefill_batch), last_only=True),
            args.warmup, args.reps)

        def generate():
            cache = model.new_cache(1)
            tok = model.prefill(prompt, cache, last_only=True).argmax(-1)
            t0 = time.perf_counter()
            for _ in range(args.decode_new):
                tok = model.step(tok, cache).argmax(-1)
            return time.perf_counter() - t0

        for _ in range(args.warmup):
            generate()
        decode_s = statistics.median(generate() for _ in range(args.reps))

    result = {
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "blas_threads": blas_threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "peer_prefill_ms": round(prefill_ms, 4),
        "peer_prefill_last_ms": round(prefill_last_ms, 4),
        "peer_decode_tok_s": round(args.decode_new / decode_s, 3),
        "prefill_batch": args.prefill_batch,
        "prefill_len": args.prefill_len,
        "decode_prompt": args.decode_prompt,
        "decode_new": args.decode_new,
        "warmup": args.warmup,
        "reps": args.reps,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


def cmd_logits(args):
    try:
        ids = [int(s) for s in args.tokens.split(",") if s.strip()]
    except ValueError:
        raise PeerError(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    if not ids:
        raise PeerError("--tokens is empty")
    model = HybridMamba.load(args.model)
    with torch.inference_mode():
        last = model.forward(torch.tensor([ids]))[0, -1]
    print("first8: " + " ".join(f"{float(x):.6g}" for x in last[:8]))
    print(f"argmax: {int(last.argmax())}")
    return 0


def cmd_write_random(args):
    text = args.config
    if not text.lstrip().startswith("{"):
        try:
            with open(text, "r", encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise PeerError(f"cannot read {args.config}: {e.strerror}")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise PeerError(f"--config is not valid JSON: {e}")
    if args.override is not None:
        try:
            over = json.loads(args.override)
        except json.JSONDecodeError as e:
            raise PeerError(f"--override is not valid JSON: {e}")
        if not isinstance(over, dict) or not isinstance(raw, dict):
            raise PeerError("--override and the config must be JSON objects")
        raw.update(over)
    cfg = Config(raw, where="--config")
    tensors = random_tensors(cfg, args.seed)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.raw, f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(args.out, "model.safetensors"), tensors,
                      {k: args.dtype for k in tensors})
    print(f"torch_peer: wrote {len(tensors)} tensors ({args.dtype}) to {args.out}")
    return 0


def cmd_grads(args):
    if args.batch < 1 or args.len < 2:
        raise PeerError("--batch must be >= 1 and --len >= 2 (the last position has no target)")
    cfg = load_config(os.path.join(args.model, "config.json"))
    path = os.path.join(args.model, "model.safetensors")
    tensors = read_safetensors(path)
    V = cfg.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, V, (args.batch, args.len), generator=g, dtype=torch.int64)
    targets = torch.cat([tokens[:, 1:], torch.full((args.batch, 1), -1, dtype=torch.int64)], dim=1)

    # float64 leaves, one per checkpoint tensor: the whole forward and backward run in double.
    leaves = {k: v.to(torch.float64).requires_grad_() for k, v in tensors.items()}
    model = HybridMamba(cfg, leaves, where=path, dtype=torch.float64)
    logits = model.forward(tokens)
    # Gradients of the training objective (cross-entropy + a true-hybrid model's budget loss);
    # "loss" is the cross-entropy alone, "budget_loss" the budget term, as the C++ returns them.
    loss, objective, budget = _objective(model, logits, targets)
    objective.backward()

    out = {"tokens": tokens.to(torch.int32), "targets": targets.to(torch.int32),
           "loss": loss.detach()}
    if budget is not None:
        out["budget_loss"] = budget.detach()
    for name, leaf in leaves.items():
        out["grad." + name] = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    write_safetensors(args.out, out, {k: "F64" for k in out if k != "tokens" and k != "targets"})

    # Self-check: the float32 model's loss on the same batch agrees to float precision.
    with torch.inference_mode():
        logits32 = HybridMamba(cfg, tensors, where=path).forward(tokens)
        loss32 = F.cross_entropy(logits32.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
    rel = abs(float(loss32) - float(loss)) / abs(float(loss))
    gmax = max(float(t.abs().max()) for k, t in out.items() if k.startswith("grad."))
    print(f"torch_peer: wrote {args.out}: B={args.batch} L={args.len}; loss {float(loss):.10g} "
          f"(float32 forward: rel diff {rel:.2g}); {len(leaves)} gradients, max |grad| {gmax:.4g}")
    if rel > 1e-5:
        print("torch_peer: self-check failed: float64 and float32 losses disagree", file=sys.stderr)
        return 1
    return 0


def cmd_train_bench(args):
    """Training steps as a PyTorch user would write them on CPU: float32 leaves, model.train()
    semantics (no dropout here, so nothing to switch), cross-entropy on next tokens, backward,
    torch.optim.AdamW, zero_grad(set_to_none=True). The Mamba scan is the Python time loop of
    HybridMamba._mamba (like Hugging Face's slow path): what a user without the CUDA kernels gets.
    peer_train_tok_s = batch x seq_len / median step time over --steps timed steps, as hm bench."""
    for name in ("threads", "batch", "steps"):
        if getattr(args, name) < 1:
            raise PeerError(f"--{name.replace('_', '-')} must be >= 1")
    if args.seq_len < 2:
        raise PeerError("--seq-len must be >= 2 (the last position has no target)")
    if args.warmup < 0:
        raise PeerError("--warmup must be >= 0")
    torch.set_num_threads(args.threads)
    blas_threads = _set_blas_threads(args.threads)
    cfg = load_config(os.path.join(args.model, "config.json"))
    path = os.path.join(args.model, "model.safetensors")
    # float32 leaves, one per checkpoint tensor; the model reads them (no copies), so AdamW's
    # updates are what the next forward sees. A tied head is the embedding leaf itself.
    leaves = {k: v.to(torch.float32).contiguous().requires_grad_() for k, v in read_safetensors(path).items()}
    V = cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (args.batch, args.seq_len), generator=g, dtype=torch.int64)
    targets = torch.cat([tokens[:, 1:], torch.full((args.batch, 1), -1, dtype=torch.int64)], dim=1)
    opt = torch.optim.AdamW(list(leaves.values()), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def step():
        # Rebuilt each step because HybridMamba derives A = -exp(A_log) at construction: that
        # belongs inside the graph so A_log gets its gradient (cheap: views, one exp per layer).
        model = HybridMamba(cfg, leaves, where=path)
        loss, objective, _ = _objective(model, model.forward(tokens), targets)
        objective.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step_ms = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = step()
        if i >= args.warmup:
            step_ms.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median(step_ms)
    result = {
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "blas_threads": blas_threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "peer_train_step_ms": round(med, 3),
        "peer_train_tok_s": round(args.batch * args.seq_len / (med / 1e3), 3),
        "peer_train_loss": loss,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"torch_peer: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    p = _Parser(prog="torch_peer", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("golden", help="write golden logits for the C++ tests")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--batch", type=int, default=2)
    s.add_argument("--len", type=int, default=12)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_golden)

    s = sub.add_parser("bench", help="time prefill and decoding")
    s.add_argument("--model", required=True)
    s.add_argument("--threads", type=int, required=True)
    s.add_argument("--prefill-batch", type=int, default=2)
    s.add_argument("--prefill-len", type=int, default=32)
    s.add_argument("--decode-prompt", type=int, default=32)
    s.add_argument("--decode-new", type=int, default=50)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--reps", type=int, default=3)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("logits", help="print last-position logits for a token list")
    s.add_argument("--model", required=True)
    s.add_argument("--tokens", required=True)
    s.set_defaults(fn=cmd_logits)

    s = sub.add_parser("write-random", help="write a random checkpoint (development)")
    s.add_argument("--out", required=True)
    s.add_argument("--config", required=True, help="JSON text or a path to config.json")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", choices=("F32", "F16", "BF16"), default="F32")
    s.add_argument("--override", help="JSON object of config fields replacing the config's "
                                      "(e.g. '{\"routing_mode\": \"hard\"}')")
    s.set_defaults(fn=cmd_write_random)

    s = sub.add_parser("grads", help="write float64 loss and parameter gradients on random tokens")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--batch", type=int, default=2)
    s.add_argument("--len", type=int, default=12)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_grads)

    s = sub.add_parser("train-bench", help="time float32 training steps (forward, loss, backward, AdamW)")
    s.add_argument("--model", required=True)
    s.add_argument("--threads", type=int, required=True)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_train_bench)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except PeerError as e:
        print(f"torch_peer: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
