#!/usr/bin/env python3
"""GPU peer for `hm bench --device cuda`: mamba_ssm's MambaLMHeadModel on OUR weights.

Runs on the lent H200 (PyTorch, Triton, and mamba_ssm + causal_conv1d on PYTHONPATH as
/work/shared/peers/README.md says). It loads one of our checkpoints (config.json +
model.safetensors, docs/MODEL.md), builds mamba_ssm's MambaLMHeadModel with the same function,
times it, and writes its logits for comparison with ours. docs/PEER_GPU.md has the same mapping
with the reasons and the figures measured with this script.

Subcommands:
  bench    times prefill, time to first token, CUDA-graph decoding, peak memory and the two
           floors (bf16 GEMM rate, device-to-device copy bandwidth); a table on stdout and one
           JSON object (--json FILE, '-' for stdout instead of the table)
  logits   writes the peer's float32 logits of one token sequence, [T, V] raw little-endian
           float32: PREFIX.prefill.bin (one full forward) and PREFIX.decode.bin (token by token
           through mamba_ssm's CUDA-graph decoding); with --ours FILE (ours, same layout) or
           --reference (bench/torch_peer.py's float32 model of docs/MODEL.md, on the CPU) prints
           max abs and relative differences and the argmax agreement
  export   writes the peer model (mamba_ssm's save_pretrained: config.json, pytorch_model.bin)
           and peer_extras.json (what its config cannot carry: norm eps, the notes below)
  train    times training steps of the peer as its users train it: float32 parameters, bf16
           autocast, PyTorch's fused AdamW, cross-entropy over the model's full logits; ms/step,
           tok/s, peak memory and the bf16 GEMM floor (JSON with --json)
  write-random  writes a random checkpoint in OUR format (torch_peer's random weights, bridge
           gates 0 as hm init writes them) for a --shape, for checks without hm

Model sources: --ckpt DIR (ours; DIR/checkpoint is taken when DIR is an hm train folder) or
--shape NAME (random weights in memory): seed (our preset, RoPE on: refused without flash_attn),
seed-norope (the seed preset with "rope": false), mamba-130m (d 768, 24 Mamba layers, vocab
50280), mamba-1.4b (d 2048, 48 layers, vocab 50280), check (a tiny model with every expressible
feature, for logits checks).

Mapping (ours -> mamba_ssm), exact unless a field is refused:
  config  d_model, n_layers -> n_layer, vocab_size (pad_vocab_size_multiple 1: no padding),
          attention_layers -> attn_layer_idx, d_ff -> d_intermediate, tie_embeddings;
          ssm_cfg = {layer: Mamba1, d_state, d_conv, expand, dt_rank (resolved), conv_bias True,
          bias False}; attn_cfg = {num_heads: n_heads, num_heads_kv: n_kv_heads, head_dim,
          qkv_proj_bias False, out_proj_bias False, causal True, softmax_scale None (= SDPA's
          1/sqrt(head_dim), ours)}; with rope: rotary_emb_dim head_dim, rotary_emb_base
          rope_theta, rotary_emb_interleaved False (rotate-half, ours); rms_norm True,
          fused_add_norm True, residual_in_fp32 True. norm_eps is not a MambaConfig field: set on
          every RMSNorm module after construction.
  tensors backbone.embeddings.weight -> backbone.embedding.weight; layers.i.norm.weight same;
          Mamba mixer tensors same names and layouts (in_proj, conv1d [E,1,K] + bias, x_proj,
          dt_proj + bias, A_log (kept float32; A = -exp(A_log) in both), D (float32), out_proj);
          attention: mixer.in_proj.weight = cat(q_proj, k_proj, v_proj) rows (its split is
          q | k | v), mixer.out_proj.weight = o_proj; MLP: norm2.weight = mlp_norm.weight,
          mlp.fc1.weight = cat(up_proj, gate_proj) rows (it computes fc1[:F] * silu(fc1[F:])),
          mlp.fc2.weight = down_proj; GatedMLP rounds the width up to a multiple of 128: the extra
          rows/columns are zeros (silu(0) * 0 = 0, exact); norm_f same; lm_head.weight (untied).
  math    Block is Add -> Norm -> Mixer with the residual carried separately (fp32): the same sum
          as ours (h += mixer(rmsnorm(h)); h += mlp(rmsnorm(h))). Conv: both cross-correlate
          with K-1 zeros in front. dt: softplus(dt_proj.weight @ dt_r + dt_proj.bias) in both.
  Mamba-2 (our mamba2_* fields): ssm_cfg = {layer: Mamba2, d_state, d_conv, expand, headdim
          mamba2_head_dim, ngroups mamba2_groups, rmsnorm mamba2_gated_norm, norm_before_gate
          mamba2_norm_before_gate, dt_limit (mamba2_dt_min, mamba2_dt_max or inf), conv_bias True,
          bias False}; its mixer tensors have our names and layouts (in_proj rows z | xBC | dt,
          conv1d over xBC, dt_bias, A_log, D per head, norm.weight, out_proj); the gated norm's
          eps is set to norm_eps as every RMSNorm's.
  refused (the message names the field): hybrid "true" (no routed layer in mamba_ssm);
          state_bridges with a non-zero gate (no bridges in mamba_ssm; all-zero gates, as hm init
          writes them, are the identity and are left out exactly); rope true without flash_attn
          (its MHA takes rotary from flash_attn); d_conv outside 2..4 (causal_conv1d); d_state
          over 256 (selective_scan, Mamba-1); Mamba-1 and Mamba-2 layers in one model (one
          ssm_cfg); mamba2_norm_per_group false with several groups (RMSNormGated normalizes each
          group).
  differs by design (reported, not refused): the peer keeps the decode SSM state and the conv
          state in the model dtype (bf16 in bench) where we keep float32; its logits are bf16.

Attention decoding without flash_attn (--attn-decode): mamba_ssm's MHA then falls back to
PyTorch SDPA with is_causal=True for a 1-token query, which SDPA aligns to the top left: the new
token sees only position 0; and under its CUDA graph the KV write position is frozen at capture.
`masked` (default) replaces that fallback for decode steps only by a graph-safe one (write K/V
at lengths_per_sample, SDPA over the cache with a key mask; KV cache zeroed once so masked slots
hold no NaN): the same model as ours. `stock` keeps mamba_ssm's code as shipped (timings of what a
user gets; its decode logits are wrong for attention models). Prefill attention is stock in both.

JSON (bench): {"tool": "cuda_peer", "method": str, "reps": int, "warmup": int, "warm_s": float,
  "versions": {torch, triton, mamba_ssm, causal_conv1d, flash_attn|null}, "device": str,
  "attn_decode": "masked"|"stock",
  "floors": {"gemm_bf16_tflops": float (torch.matmul 8192^3, median), "copy_gb_s": float
             (device-to-device copy of 1 GiB, bytes read + written, median)},
  "models": [{"name", "source" (ckpt dir or "random"), "config" (ours, config.json fields),
    "peer_config" (MambaConfig fields), "notes": [str], "params": int, "param_bytes": int,
    "prefill": [{"batch", "seq_len", "ms", "tok_s", "peak_mem_bytes", "logits": "last"}],
    "decode": [{"batch", "context", "ttft_ms", "ms_per_step", "tok_s", "peak_mem_bytes",
                "new_tokens": 128}]}]}
Decode: T(n) = wall time of MambaLMHeadModel.generate(prompt, max_length=context+n, cg=True,
top_k=1), synchronised; each n warmed first (n=129 once first, so the graph cache is captured
once for the larger length, then n=1 for at least --warm-s); ms_per_step = (median T(129) - median T(1)) / 128; tok_s =
batch / ms_per_step; ttft_ms = median T(1) (prefill of the prompt and the first token). Prefill:
CUDA events around model(ids, num_last_tokens=1), after --warmup calls and --warm-s seconds. Peak memory: torch.cuda.max_memory_allocated
after a reset before the timed runs of that measurement (weights and caches included).

Exit codes: 0 success, 1 a check failed (logits beyond --tol), 2 bad input or a refused config.
"""

import argparse
import gc
import importlib
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_peer  # noqa: E402  (our config, checkpoint reader/writer, random weights, fp32 model)
from torch_peer import PeerError  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# Our presets (src/model/config.cpp preset(); every field, as hm init writes config.json).
_SEED = {"model_type": "hybrid-mamba", "hybrid": "simple", "d_model": 512, "n_layers": 12,
         "attention_layers": [3, 6, 9], "vocab_size": 32000, "d_state": 16, "d_conv": 4,
         "expand": 2, "dt_rank": "auto", "n_heads": 8, "n_kv_heads": 8, "rope": True,
         "rope_theta": 10000.0, "d_ff": 0, "norm_eps": 1e-5, "tie_embeddings": True,
         "state_bridges": True}
SHAPES = {
    "seed": _SEED,
    "seed-norope": dict(_SEED, rope=False),
    "mamba-130m": dict(_SEED, d_model=768, n_layers=24, attention_layers=[], vocab_size=50280),
    "mamba-1.4b": dict(_SEED, d_model=2048, n_layers=48, attention_layers=[], vocab_size=50280),
    # For logits checks: our tiny preset without RoPE, untied, another eps: GQA, the MLP (width 48,
    # padded to 128 by the peer), bridges and the norm_eps override all in one small model.
    "check": dict(_SEED, d_model=32, n_layers=4, attention_layers=[1, 3], vocab_size=300, d_state=8,
                  n_heads=4, n_kv_heads=2, d_ff=48, rope=False, tie_embeddings=False, norm_eps=1e-6),
}
DEFAULT_SHAPES = "seed-norope,mamba-130m,mamba-1.4b"
DEFAULT_DECODE = "1x16,16x16,64x16,1x128,16x128,1x8192,16x8192"
NEW_TOKENS = 128


def json_safe(v):
    """v with every non-finite float as a string: JSON has no infinity (a Mamba-2 dt_limit's
    upper end is inf), and our reader rejects Python's Infinity literal."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


# ----------------------------------------------------------------------------- the peer's modules


def import_peer():
    """mamba_ssm's pieces, or a PeerError that says how to make them importable."""
    try:
        mixer = importlib.import_module("mamba_ssm.models.mixer_seq_simple")
        cfgmod = importlib.import_module("mamba_ssm.models.config_mamba")
        mha = importlib.import_module("mamba_ssm.modules.mha")
        ln = importlib.import_module("mamba_ssm.ops.triton.layer_norm")
    except ImportError as e:
        raise PeerError(f"mamba_ssm is not importable ({e}); unpack the prebuilt peers and set "
                        f"PYTHONPATH as docs/PEER_GPU.md says")
    return mixer, cfgmod, mha, ln


def flash_attn_present(mha):
    return mha.flash_attn_with_kvcache is not None and mha.RotaryEmbedding is not None


def install_attn_decode(mha, mode):
    """mode 'masked': a graph-safe, correct decode fallback for MHA (module docstring)."""
    if mode == "stock" or flash_attn_present(mha):
        return
    MHA = mha.MHA
    if getattr(MHA, "_cuda_peer_masked", False):
        return
    stock_update = MHA._update_kvcache_attention
    stock_alloc = MHA.allocate_inference_cache

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None):
        kv_cache, conv_state = stock_alloc(self, batch_size, max_seqlen, dtype=dtype)
        kv_cache.zero_()  # masked keys get weight 0, but 0 * NaN from an unwritten slot is NaN
        return kv_cache, conv_state

    def update_kvcache_attention(self, q, kv, inference_params):
        if inference_params.seqlen_offset == 0:  # prefill: the stock path is right
            return stock_update(self, q, kv, inference_params)
        kv_cache, _ = inference_params.key_value_memory_dict[self.layer_idx]
        b = q.shape[0]
        kv_cache = kv_cache[:b]  # [b, S, 2, G, hd]
        S = kv_cache.shape[1]
        if inference_params.lengths_per_sample is not None:  # set before each graph replay
            pos = inference_params.lengths_per_sample[:b].long()
        else:
            pos = torch.full((b,), inference_params.seqlen_offset, dtype=torch.long, device=q.device)
        kv_cache[torch.arange(b, device=q.device), pos] = kv[:, 0]
        k, v = kv_cache.unbind(dim=2)  # [b, S, G, hd]
        if self.num_heads != self.num_heads_kv:
            k = torch.repeat_interleave(k, dim=2, repeats=self.num_heads // self.num_heads_kv)
            v = torch.repeat_interleave(v, dim=2, repeats=self.num_heads // self.num_heads_kv)
        keep = torch.arange(S, device=q.device)[None, :] <= pos[:, None]  # [b, S]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=keep[:, None, None, :], scale=self.softmax_scale)
        return out.transpose(1, 2)

    MHA.allocate_inference_cache = allocate_inference_cache
    MHA._update_kvcache_attention = update_kvcache_attention
    MHA._cuda_peer_masked = True


# ----------------------------------------------------------------------------- our side

def load_ours(path):
    """(Config, {name: float tensor}) from an hm model folder, validated by torch_peer."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")) \
            and os.path.exists(os.path.join(path, "checkpoint", "config.json")):
        path = os.path.join(path, "checkpoint")
    if not os.path.isdir(path):
        raise PeerError(f"model directory {path} does not exist")
    cfg = load_config(os.path.join(path, "config.json"))
    st = os.path.join(path, "model.safetensors")
    tensors = torch_peer.read_safetensors(st)
    check_tensors(cfg, tensors, st)
    return cfg, tensors


# Our Mamba-2 fields (src/model/config.h): torch_peer's model has no Mamba-2 layer, so they are
# read here, apart from the fields torch_peer.Config checks.
_MAMBA2_FIELDS = {
    "mamba2_layers": ("a list of ints", lambda v: isinstance(v, list) and all(isinstance(x, int) for x in v), []),
    "mamba2_head_dim": ("an int > 0", lambda v: isinstance(v, int) and v > 0, 64),
    "mamba2_groups": ("an int > 0", lambda v: isinstance(v, int) and v > 0, 1),
    "mamba2_norm_per_group": ("a bool", lambda v: isinstance(v, bool), True),
    "mamba2_gated_norm": ("a bool", lambda v: isinstance(v, bool), True),
    "mamba2_norm_before_gate": ("a bool", lambda v: isinstance(v, bool), False),
    "mamba2_dt_min": ("a number >= 0", lambda v: isinstance(v, (int, float)) and v >= 0, 0.0),
    "mamba2_dt_max": ("a number", lambda v: isinstance(v, (int, float)), float("inf")),
}


def load_config(path):
    """torch_peer's Config, with .mamba2 (a dict of the Mamba-2 fields, defaults filled) and
    .is_mamba2 per layer."""
    raw = torch_peer.read_json(path)
    if not isinstance(raw, dict):
        raise PeerError(f"{path}: expected a JSON object")
    m2 = {}
    for key, (want, ok, default) in _MAMBA2_FIELDS.items():
        v = raw.pop(key, default)
        if not ok(v):
            raise PeerError(f"{path}: field '{key}' must be {want}, got {json.dumps(v)}")
        m2[key] = v
    cfg = torch_peer.Config(raw, where=path)
    for i in m2["mamba2_layers"]:
        if not 0 <= i < cfg.n_layers or not cfg.has_mamba[i] or cfg.is_true[i]:
            raise PeerError(f"{path}: field 'mamba2_layers' has {i}, not a Mamba layer of 0..{cfg.n_layers - 1}")
    E, hd, G = cfg.d_inner, m2["mamba2_head_dim"], m2["mamba2_groups"]
    if m2["mamba2_layers"] and (E % hd or (E // hd) % G):
        raise PeerError(f"{path}: d_inner {E} is not a whole number of heads of {hd} in {G} groups")
    cfg.mamba2 = m2
    cfg.is_mamba2 = [i in set(m2["mamba2_layers"]) for i in range(cfg.n_layers)]
    return cfg


def expected_shapes(cfg):
    """torch_peer's shapes with each Mamba-2 layer's mixer in place of a Mamba-1 one."""
    s = torch_peer.expected_shapes(cfg)
    m2 = getattr(cfg, "mamba2", None)
    for i in range(cfg.n_layers):
        if not (m2 and cfg.is_mamba2[i]):
            continue
        p = f"backbone.layers.{i}.mixer."
        for n in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                  "dt_proj.bias", "A_log", "D", "out_proj.weight"):
            del s[p + n]
        D, E, N, K = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.d_conv
        H, G = E // m2["mamba2_head_dim"], m2["mamba2_groups"]
        CD = E + 2 * G * N
        s[p + "in_proj.weight"] = [E + CD + H, D]
        s[p + "conv1d.weight"] = [CD, 1, K]
        s[p + "conv1d.bias"] = [CD]
        s[p + "dt_bias"] = [H]
        s[p + "A_log"] = [H]
        s[p + "D"] = [H]
        if m2["mamba2_gated_norm"]:
            s[p + "norm.weight"] = [E]
        s[p + "out_proj.weight"] = [D, E]
    return s


def check_tensors(cfg, tensors, where):
    want = expected_shapes(cfg)
    missing, extra = want.keys() - tensors.keys(), tensors.keys() - want.keys()
    if missing:
        raise PeerError(f"{where}: missing tensors: {sorted(missing)[:8]}")
    if extra:
        raise PeerError(f"{where}: unexpected tensors: {sorted(extra)[:8]}")
    for name, shape in want.items():
        if list(tensors[name].shape) != shape:
            raise PeerError(f"{where}: tensor '{name}' has shape {list(tensors[name].shape)}, expected {shape}")
        if not tensors[name].dtype.is_floating_point:
            raise PeerError(f"{where}: tensor '{name}' is {tensors[name].dtype}, expected a float type")


def random_ours(shape, seed):
    """Our config and random weights for a named shape; bridge gates 0, as hm init writes them."""
    if shape not in SHAPES:
        raise PeerError(f"unknown --shape '{shape}' (known: {', '.join(SHAPES)})")
    cfg = torch_peer.Config(dict(SHAPES[shape]), where=f"shape {shape}")
    tensors = torch_peer.random_tensors(cfg, seed)
    for name in tensors:
        if name.startswith("backbone.bridges.") and name.endswith(".gate"):
            tensors[name].zero_()
    return cfg, tensors


# ----------------------------------------------------------------------------- the mapping

def peer_config(cfg, tensors, have_flash_attn):
    """MambaConfig fields for our config, and notes; PeerError naming the field that mamba_ssm
    cannot express."""
    def refuse(field, why):
        raise PeerError(f"config field '{field}' cannot be expressed in mamba_ssm: {why}")

    notes = []
    if cfg.hybrid == "true":
        refuse("hybrid", f"\"true\" (true_layers {cfg.true_layers}): mamba_ssm has no layer that "
                         f"routes tokens between a Mamba and an attention path")
    has_mamba = any(cfg.has_mamba)
    m2 = getattr(cfg, "mamba2", None)
    mamba2 = bool(m2 and m2["mamba2_layers"])
    if mamba2 and sorted(m2["mamba2_layers"]) != [i for i in range(cfg.n_layers) if cfg.has_mamba[i]]:
        refuse("mamba2_layers", f"{m2['mamba2_layers']}: MambaLMHeadModel has one ssm_cfg, so its Mamba "
                                f"layers are all Mamba-1 or all Mamba-2")
    if mamba2 and m2["mamba2_gated_norm"] and m2["mamba2_groups"] > 1 and not m2["mamba2_norm_per_group"]:
        refuse("mamba2_norm_per_group", "false with several groups: RMSNormGated normalizes each group")
    if has_mamba and not 2 <= cfg.d_conv <= 4:
        refuse("d_conv", f"{cfg.d_conv}: causal_conv1d supports widths 2..4")
    if has_mamba and not mamba2 and cfg.d_state > 256:
        refuse("d_state", f"{cfg.d_state}: selective_scan supports at most 256")
    attn = sorted(cfg.attention_layers)
    if attn and cfg.rope and not have_flash_attn:
        refuse("rope", "true: mamba_ssm's MHA takes rotary embeddings from flash_attn, which is not "
                       "installed here; write the model with \"rope\": false")
    bridges = [i for i in range(cfg.n_layers) if cfg.has_bridge(i)]
    live = [i for i in bridges if float(tensors[f"backbone.bridges.{i}.gate"].abs().max()) != 0.0]
    if live:
        refuse("state_bridges", f"true with non-zero gates into layers {live}: mamba_ssm has no "
                                f"bridges (only all-zero gates, the identity, can be left out)")
    if bridges:
        notes.append(f"state_bridges: the bridges into layers {bridges} have all-zero gates (the "
                     f"identity, as hm init writes them) and are left out; exact")
    if cfg.d_ff > 0 and cfg.d_ff % 128:
        notes.append(f"d_ff {cfg.d_ff}: GatedMLP rounds its width to {-(-cfg.d_ff // 128) * 128}; "
                     f"the extra rows and columns are zeros (exact, a little more work)")
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731 (hm writes a float32)
    if f32(cfg.norm_eps) != f32(1e-5):
        notes.append(f"norm_eps {cfg.norm_eps}: set on every RMSNorm after construction")
    if has_mamba:
        notes.append("decode SSM and conv states are kept in the model dtype by mamba_ssm "
                     "(ours: float32)")
    attn_cfg = {}
    if attn:
        attn_cfg = {"num_heads": cfg.n_heads, "num_heads_kv": cfg.n_kv_heads, "head_dim": cfg.head_dim,
                    "qkv_proj_bias": False, "out_proj_bias": False, "causal": True,
                    "softmax_scale": None}
        if cfg.rope:
            attn_cfg.update({"rotary_emb_dim": cfg.head_dim, "rotary_emb_base": cfg.rope_theta,
                             "rotary_emb_interleaved": False})
    ssm_cfg = {"layer": "Mamba1", "d_state": cfg.d_state, "d_conv": cfg.d_conv,
               "expand": cfg.expand, "dt_rank": cfg.dt_rank, "conv_bias": True, "bias": False}
    if mamba2:
        ssm_cfg = {"layer": "Mamba2", "d_state": cfg.d_state, "d_conv": cfg.d_conv, "expand": cfg.expand,
                   "headdim": m2["mamba2_head_dim"], "ngroups": m2["mamba2_groups"],
                   "rmsnorm": m2["mamba2_gated_norm"], "norm_before_gate": m2["mamba2_norm_before_gate"],
                   "dt_limit": (float(m2["mamba2_dt_min"]), float(m2["mamba2_dt_max"])),
                   "conv_bias": True, "bias": False}
    mc = {
        "d_model": cfg.d_model, "d_intermediate": cfg.d_ff, "n_layer": cfg.n_layers,
        "vocab_size": cfg.vocab_size,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": attn, "attn_cfg": attn_cfg, "rms_norm": True, "residual_in_fp32": True,
        "fused_add_norm": True, "pad_vocab_size_multiple": 1, "tie_embeddings": cfg.tie_embeddings,
    }
    return mc, notes


def peer_tensors(cfg, t, mlp_width):
    """Our tensors under mamba_ssm's names and layouts (module docstring); mlp_width is the
    GatedMLP's rounded hidden width."""
    def pad_rows(w, n):
        return torch.cat([w, w.new_zeros(n - w.shape[0], w.shape[1])]) if n > w.shape[0] else w

    out = {"backbone.embedding.weight": t["backbone.embeddings.weight"],
           "backbone.norm_f.weight": t["backbone.norm_f.weight"]}
    out["lm_head.weight"] = t["backbone.embeddings.weight" if cfg.tie_embeddings else "lm_head.weight"]
    for i in range(cfg.n_layers):
        p = f"backbone.layers.{i}."
        out[p + "norm.weight"] = t[p + "norm.weight"]
        if cfg.is_attn[i]:
            out[p + "mixer.in_proj.weight"] = torch.cat(
                [t[p + "mixer.q_proj.weight"], t[p + "mixer.k_proj.weight"], t[p + "mixer.v_proj.weight"]])
            out[p + "mixer.out_proj.weight"] = t[p + "mixer.o_proj.weight"]
        else:  # Mamba-1 or Mamba-2: the same names (expected_shapes says which are there)
            for n in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                      "dt_proj.bias", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"):
                if p + "mixer." + n in t:
                    out[p + "mixer." + n] = t[p + "mixer." + n]
        if cfg.d_ff > 0:
            out[p + "norm2.weight"] = t[p + "mlp_norm.weight"]
            out[p + "mlp.fc1.weight"] = torch.cat([pad_rows(t[p + "mlp.up_proj.weight"], mlp_width),
                                                   pad_rows(t[p + "mlp.gate_proj.weight"], mlp_width)])
            out[p + "mlp.fc2.weight"] = pad_rows(t[p + "mlp.down_proj.weight"].t(), mlp_width).t()
    return out


def build_peer(cfg, tensors, dtype, device="cuda"):
    """(MambaLMHeadModel with our weights, its MambaConfig fields, notes)."""
    mixer, cfgmod, mha, ln = import_peer()
    mc, notes = peer_config(cfg, tensors, flash_attn_present(mha))
    torch.manual_seed(0)
    model = mixer.MambaLMHeadModel(cfgmod.MambaConfig(**mc), device=device, dtype=dtype)
    model.eval()
    for m in model.modules():
        # Mamba-2's gated norm is layernorm_gated.RMSNorm, another class of the same name
        if isinstance(m, ln.RMSNorm) or type(m).__module__.endswith("layernorm_gated"):
            m.eps = cfg.norm_eps
    mlp_width = 0
    if cfg.d_ff > 0:
        mlp_width = model.backbone.layers[0].mlp.fc2.weight.shape[1]
    ours = peer_tensors(cfg, tensors, mlp_width)
    theirs = model.state_dict()  # views of the parameters (the tied head appears under both names)
    missing, extra = theirs.keys() - ours.keys(), ours.keys() - theirs.keys()
    if missing or extra:
        raise AssertionError(f"mapping out of step with MambaLMHeadModel: missing {sorted(missing)[:6]}, "
                             f"extra {sorted(extra)[:6]}")
    with torch.no_grad():
        for name, dst in theirs.items():
            src = ours[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise AssertionError(f"{name}: ours {tuple(src.shape)} vs peer {tuple(dst.shape)}")
            dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
    if cfg.tie_embeddings and model.lm_head.weight.data_ptr() != model.backbone.embedding.weight.data_ptr():
        raise AssertionError("tie_embeddings: the peer's lm_head is not the embedding")
    return model, mc, notes


def get_model(args, dtype):
    """(name, source, cfg, model, peer config, notes) for --ckpt or a single --shape."""
    if args.ckpt:
        cfg, tensors = load_ours(args.ckpt)
        name, source = os.path.basename(os.path.normpath(args.ckpt)), args.ckpt
    else:
        cfg, tensors = random_ours(args.shape, args.seed)
        name, source = args.shape, "random"
    model, mc, notes = build_peer(cfg, tensors, dtype)
    return name, source, cfg, tensors, model, mc, notes


# ----------------------------------------------------------------------------- timing

def sync():
    torch.cuda.synchronize()


def floors(reps):
    """bf16 GEMM rate (8192^3) and device-to-device copy bandwidth, medians after warm-up."""
    n = 8192
    mats = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]  # zeros run faster
    gemm = event_times(lambda: torch.matmul(mats[0], mats[1]), 3, max(reps, 10))
    mats.clear()
    bufs = [torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)]  # 1 GiB
    bufs.append(torch.empty_like(bufs[0]))
    copy = event_times(lambda: bufs[1].copy_(bufs[0]), 3, max(reps, 10))
    nbytes = 2 * bufs[0].numel() * bufs[0].element_size()  # read + written
    bufs.clear()
    gc.collect()
    torch.cuda.empty_cache()
    return {"gemm_bf16_tflops": round(2 * n ** 3 / (statistics.median(gemm) * 1e-3) / 1e12, 1),
            "copy_gb_s": round(nbytes / (statistics.median(copy) * 1e-3) / 1e9, 1)}


def event_times(fn, warmup, reps):
    """Milliseconds of each timed call, by CUDA events."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e))
    return out


def warm_up(fn, calls, seconds):
    """At least `calls` calls and `seconds` of them: a run on the H200 found the first
    measurement after an idle spell (weights built on the CPU) up to 2x slow with 2 calls."""
    t0 = time.perf_counter()
    n = 0
    while n < calls or time.perf_counter() - t0 < seconds:
        fn()
        sync()
        n += 1


def bench_prefill(model, V, batch, seq_len, warmup, reps, gen, warm_s):
    ids = torch.randint(0, V, (batch, seq_len), device="cuda", generator=gen)
    with torch.inference_mode():
        warm_up(lambda: model(ids, num_last_tokens=1), warmup, warm_s)
        torch.cuda.reset_peak_memory_stats()
        ms = statistics.median(event_times(lambda: model(ids, num_last_tokens=1), 0, reps))
        peak = torch.cuda.max_memory_allocated()
    return {"batch": batch, "seq_len": seq_len, "ms": round(ms, 4),
            "tok_s": round(batch * seq_len / (ms * 1e-3), 1), "peak_mem_bytes": peak, "logits": "last"}


def bench_decode(model, V, batch, context, reps, gen, warm_s):
    prompt = torch.randint(0, V, (batch, context), device="cuda", generator=gen)
    model._decoding_cache = None  # each measurement captures its own graphs
    gc.collect()
    torch.cuda.empty_cache()

    def run(n):
        sync()
        t0 = time.perf_counter()
        model.generate(input_ids=prompt, max_length=context + n, cg=True, top_k=1)
        sync()
        return (time.perf_counter() - t0) * 1e3

    run(NEW_TOKENS + 1)  # warm the longer length first: the graphs are captured for it once
    warm_up(lambda: run(1), 1, warm_s)
    torch.cuda.reset_peak_memory_stats()
    long_ms, short_ms = [], []
    for _ in range(reps):
        long_ms.append(run(NEW_TOKENS + 1))
        short_ms.append(run(1))
    peak = torch.cuda.max_memory_allocated()
    step = (statistics.median(long_ms) - statistics.median(short_ms)) / NEW_TOKENS
    model._decoding_cache = None
    return {"batch": batch, "context": context, "ttft_ms": round(statistics.median(short_ms), 3),
            "ms_per_step": round(step, 5), "tok_s": round(batch / (step * 1e-3), 1) if step > 0 else None,
            "peak_mem_bytes": peak, "new_tokens": NEW_TOKENS}


def parse_decode(text):
    out = []
    for part in text.split(","):
        try:
            b, c = part.lower().split("x")
            out.append((int(b), int(c)))
        except ValueError:
            raise PeerError(f"--decode wants BATCHxCONTEXT items separated by commas, got {part!r}")
        if out[-1][0] < 1 or out[-1][1] < 1:
            raise PeerError(f"--decode: batch and context must be >= 1, got {part!r}")
    return out


def versions(mha):
    v = {"torch": torch.__version__}
    for mod in ("triton", "mamba_ssm", "causal_conv1d"):
        try:
            v[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except ImportError:
            v[mod] = None
    try:
        v["flash_attn"] = importlib.import_module("flash_attn").__version__
    except ImportError:
        v["flash_attn"] = None
    return v


def gib(n):
    return f"{n / 2**30:.2f}"


def table(result):
    lines = [f"device: {result['device']}; floors: bf16 GEMM {result['floors']['gemm_bf16_tflops']} "
             f"TFLOP/s, copy {result['floors']['copy_gb_s']} GB/s; attention decode: {result['attn_decode']}; "
             f"medians of {result['reps']} reps"]
    for m in result["models"]:
        lines.append(f"\n{m['name']} ({m['source']}): {m['params'] / 1e6:.1f} M params")
        for n in m["notes"]:
            lines.append(f"  note: {n}")
        if m.get("refused"):
            lines.append(f"  refused: {m['refused']}")
            continue
        lines.append("  prefill   batch x len   ms        tok/s       peak GiB")
        for r in m["prefill"]:
            lines.append(f"            {r['batch']:>3} x {r['seq_len']:<6} {r['ms']:<9.3f} {r['tok_s']:<11.0f} "
                         f"{gib(r['peak_mem_bytes'])}")
        lines.append("  decode    batch x ctx   TTFT ms   ms/step   tok/s       peak GiB")
        for r in m["decode"]:
            tok = f"{r['tok_s']:.0f}" if r["tok_s"] else "-"
            lines.append(f"            {r['batch']:>3} x {r['context']:<6} {r['ttft_ms']:<9.2f} "
                         f"{r['ms_per_step']:<9.4f} {tok:<11} {gib(r['peak_mem_bytes'])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- commands

def need_cuda():
    if not torch.cuda.is_available():
        raise PeerError("no CUDA device: this script runs on the GPU machine")


def cmd_bench(args):
    need_cuda()
    if args.reps < 1 or args.warmup < 0 or not args.warm_s >= 0:
        raise PeerError("--reps must be >= 1, --warmup and --warm-s >= 0")
    _, _, mha, _ = import_peer()
    install_attn_decode(mha, args.attn_decode)
    decode_cfgs = parse_decode(args.decode)
    prefill_batches = [int(b) for b in args.prefill_batches.split(",") if b]  # "": decode cases only
    result = {"tool": "cuda_peer", "method": __doc__[__doc__.index("Decode: T(n)"):
                                                      __doc__.index("Exit codes")].strip(),
              "reps": args.reps, "warmup": args.warmup, "warm_s": args.warm_s, "versions": versions(mha),
              "device": torch.cuda.get_device_name(), "attn_decode": args.attn_decode,
              "floors": floors(args.reps), "models": []}
    sources = [("ckpt", args.ckpt)] if args.ckpt else [("shape", s) for s in args.shapes.split(",")]
    for kind, src in sources:
        if kind == "ckpt":
            cfg, tensors = load_ours(src)
            name = os.path.basename(os.path.normpath(src))
        else:
            cfg, tensors = random_ours(src, args.seed)
            name, src = src, "random"
        entry = {"name": name, "source": src, "config": cfg.raw, "notes": []}
        try:
            model, mc, notes = build_peer(cfg, tensors, torch.bfloat16)
        except PeerError as e:
            if kind == "ckpt":
                raise
            entry.update({"refused": str(e), "params": torch_peer_params(cfg)})
            result["models"].append(entry)
            continue
        del tensors
        entry.update({"peer_config": json_safe(mc), "notes": notes,
                      "params": sum(p.numel() for p in model.parameters()),
                      "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                      "prefill": [], "decode": []})
        gen = torch.Generator(device="cuda").manual_seed(args.seed)
        for b in prefill_batches:
            entry["prefill"].append(bench_prefill(model, cfg.vocab_size, b, args.prefill_len,
                                                  max(args.warmup, 1), args.reps, gen, args.warm_s))
        for b, c in decode_cfgs:
            entry["decode"].append(bench_decode(model, cfg.vocab_size, b, c, args.reps, gen, args.warm_s))
        result["models"].append(entry)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        if args.json and args.json != "-":  # after each model, so a cut-off run keeps what it has
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)
    if args.json == "-":
        print(json.dumps(result))
    else:
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)
        print(table(result))
    return 0


def torch_peer_params(cfg):
    return sum(math.prod(s) for s in expected_shapes(cfg).values())


def compare(name, ours, peer):
    """Prints and returns (max abs diff, relative: max abs / max |ours|, argmax agreement)."""
    diff = float((peer - ours).abs().max())
    rel = diff / max(float(ours.abs().max()), 1e-30)
    agree = float((peer.argmax(-1) == ours.argmax(-1)).float().mean())
    print(f"  {name:<28} max abs {diff:.4g}   rel {rel:.4g}   argmax agree {agree:.4f}")
    return diff, rel, agree


def read_logits(path, T, V):
    import numpy as np
    try:
        a = np.fromfile(path, dtype="<f4")
    except OSError as e:
        raise PeerError(f"cannot read {path}: {e.strerror}")
    if a.size != T * V:
        raise PeerError(f"{path}: holds {a.size} float32 values, expected T x V = {T} x {V} = {T * V}")
    return torch.from_numpy(a.reshape(T, V).copy())


def cmd_logits(args):
    need_cuda()
    _, _, mha, _ = import_peer()
    install_attn_decode(mha, args.attn_decode)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    name, source, cfg, tensors, model, mc, notes = get_model(args, dtype)
    V = cfg.vocab_size
    if args.tokens:
        try:
            ids = [int(s) for s in args.tokens.split(",") if s.strip()]
        except ValueError:
            raise PeerError(f"--tokens must be comma-separated integers, got {args.tokens!r}")
        bad = [i for i in ids if not 0 <= i < V]
        if not ids or bad:
            raise PeerError(f"--tokens must be non-empty ids in [0, {V}), got {bad[:4] or 'none'}")
        tokens = torch.tensor([ids], dtype=torch.long)
    else:
        if args.len < 1:
            raise PeerError("--len must be >= 1")
        tokens = torch.randint(0, V, (1, args.len), generator=torch.Generator().manual_seed(args.seed))
    T = tokens.shape[1]
    ids = tokens.cuda()
    with torch.inference_mode():
        prefill = model(ids).logits[0].float().cpu()
        # Token by token through mamba_ssm's own decode loop and CUDA graphs, teacher-forced.
        out = model.generate(input_ids=ids[:, :1], max_length=T + 1, cg=True, top_k=1,
                             teacher_outputs=ids, output_scores=True, return_dict_in_generate=True)
        decode = torch.stack(list(out.scores), dim=1)[0, :T].float().cpu()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    prefill.numpy().astype("<f4").tofile(args.out + ".prefill.bin")
    decode.numpy().astype("<f4").tofile(args.out + ".decode.bin")
    with open(args.out + ".tokens.txt", "w", encoding="utf-8") as f:
        f.write(",".join(str(int(x)) for x in tokens[0]) + "\n")
    print(f"cuda_peer: {name}: T={T} V={V} dtype {args.dtype}, attention decode {args.attn_decode}; wrote "
          f"{args.out}.prefill.bin, {args.out}.decode.bin ([T, V] float32 LE), {args.out}.tokens.txt")
    for n in notes:
        print(f"  note: {n}")
    worst = 0.0
    compare("peer decode vs peer prefill", prefill, decode)
    refs = []
    if args.reference:
        ref_model = torch_peer.HybridMamba(cfg, tensors, where=source)
        with torch.inference_mode():
            refs.append(("reference", ref_model.forward(tokens)[0].float()))
    if args.ours:
        refs.append(("ours", read_logits(args.ours, T, V)))
    for label, ref in refs:
        for what, peer in (("prefill", prefill), ("decode", decode)):
            _, rel, _ = compare(f"peer {what} vs {label}", ref, peer)
            worst = max(worst, rel)
    if refs and not worst <= args.tol:
        print(f"cuda_peer: logits differ by {worst:.3g} relative, over --tol {args.tol}", file=sys.stderr)
        return 1
    return 0


def cmd_export(args):
    _, _, mha, _ = import_peer()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg, tensors = load_ours(args.ckpt)
    model, mc, notes = build_peer(cfg, tensors, dtype, device="cuda" if torch.cuda.is_available() else "cpu")
    model.save_pretrained(args.out)
    with open(os.path.join(args.out, "peer_extras.json"), "w", encoding="utf-8") as f:
        json.dump({"norm_eps": cfg.norm_eps, "notes": notes, "ours": cfg.raw}, f, indent=2)
    print(f"cuda_peer: wrote {args.out}/config.json, pytorch_model.bin, peer_extras.json")
    for n in notes:
        print(f"  note: {n}")
    return 0


def cmd_write_random(args):
    cfg, tensors = random_ours(args.shape, args.seed)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.raw, f, indent=2)
        f.write("\n")
    # A_log stays float32, as hm's save_params writes it.
    dtypes = {k: ("F32" if k.endswith("A_log") else args.dtype) for k in tensors}
    torch_peer.write_safetensors(os.path.join(args.out, "model.safetensors"), tensors, dtypes)
    print(f"cuda_peer: wrote {len(tensors)} tensors ({args.dtype}) for shape {args.shape} to {args.out}")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"cuda_peer: {message}", file=sys.stderr)
        sys.exit(2)


def cmd_train(args):
    need_cuda()
    name, source, cfg, tensors, model, mc, notes = get_model(args, torch.float32)
    model.train()
    V = cfg.vocab_size
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    ids = torch.randint(0, V, (args.batch, args.seq_len + 1), device="cuda", generator=gen)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, V), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    warm_up(step, args.warmup, args.warm_s)
    torch.cuda.reset_peak_memory_stats()
    ms = statistics.median(event_times(step, 0, args.reps))
    peak = torch.cuda.max_memory_allocated()
    params = sum(p.numel() for p in model.parameters())
    tokens = args.batch * args.seq_len
    out = {"peer": "mamba_ssm MambaLMHeadModel, bf16 autocast, fused AdamW", "model": name, "params": params,
           "batch": args.batch, "seq_len": args.seq_len, "ms_per_step": round(ms, 3),
           "tok_s": round(tokens / (ms * 1e-3), 1), "peak_mem_bytes": peak,
           "model_tflops": round(6 * params * tokens / (ms * 1e-3) / 1e12, 2), "floors": floors(args.reps),
           "notes": notes}
    out["mfu"] = round(out["model_tflops"] / out["floors"]["gemm_bf16_tflops"], 4)
    text = json.dumps(out, indent=1)
    if args.json and args.json != "-":
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


def main(argv=None):
    p = _Parser(prog="cuda_peer", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(s, shape_default):
        s.add_argument("--ckpt", help="our model folder (config.json + model.safetensors)")
        s.add_argument("--seed", type=int, default=0, help="random weights (--shape) and tokens")
        if shape_default is not None:
            s.add_argument("--shape", default=shape_default, choices=sorted(SHAPES),
                           help="random weights of this shape when no --ckpt")

    s = sub.add_parser("bench", help="time the peer; table, and JSON with --json")
    model_args(s, None)
    s.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of shapes when no --ckpt")
    s.add_argument("--reps", type=int, default=5)
    s.add_argument("--warmup", type=int, default=2, help="prefill warm-up runs (decode: one per length)")
    s.add_argument("--warm-s", type=float, default=0.5, help="least seconds of warm-up per measurement")
    s.add_argument("--prefill-batches", default="1,8")
    s.add_argument("--prefill-len", type=int, default=2048)
    s.add_argument("--decode", default=DEFAULT_DECODE, help="BATCHxCONTEXT list")
    s.add_argument("--attn-decode", choices=("masked", "stock"), default="masked")
    s.add_argument("--json", help="write the JSON object here ('-': to stdout, no table)")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("logits", help="write the peer's prefill and decode logits of one sequence")
    model_args(s, "seed-norope")
    s.add_argument("--out", required=True, help="path prefix of the .bin files")
    s.add_argument("--tokens", help="comma-separated ids (default: --len random ids from --seed)")
    s.add_argument("--len", type=int, default=64)
    s.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    s.add_argument("--attn-decode", choices=("masked", "stock"), default="masked")
    s.add_argument("--ours", help="our logits, raw little-endian float32 [T, V]")
    s.add_argument("--reference", action="store_true", help="also compare with torch_peer's float32 model")
    s.add_argument("--tol", type=float, default=1e-3, help="largest relative difference that passes")
    s.set_defaults(fn=cmd_logits)

    s = sub.add_parser("export", help="write the peer model of our checkpoint")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("train", help="time the peer's training steps (bf16 autocast, fused AdamW)")
    model_args(s, "seed-norope")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--seq-len", type=int, default=2048)
    s.add_argument("--reps", type=int, default=10)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--warm-s", type=float, default=1.0)
    s.add_argument("--json", help="also write the JSON object here")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("write-random", help="write a random checkpoint in our format")
    s.add_argument("--shape", required=True, choices=sorted(SHAPES))
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", choices=("F32", "F16", "BF16"), default="F32")
    s.set_defaults(fn=cmd_write_random)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except PeerError as e:
        print(f"cuda_peer: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
