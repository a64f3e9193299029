"""HybridMambaConfig: the seed's configuration class, checked by the engine's own config.json
rules (src/model/config.cpp), so a bad value gets the message config.json would get."""
import json

import numpy as np

from . import _core

# Every field with its default, as the engine defines them (the seed's benchmark model).
_DEFAULTS = json.loads(_core.default_config())


def _jsonable(v):
    """NumPy scalars and arrays (and anything with .tolist()) as plain Python values."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class HybridMambaConfig:
    """Hyper-parameters of a hybrid Mamba/attention model (docs/MODEL.md, docs/TRUE_HYBRID.md).

    Keyword arguments are the fields of config.json, with the seed's defaults::

        HybridMambaConfig(d_model=512, n_layers=12, attention_layers=[3, 6, 9], vocab_size=32000)

    Fields: hybrid ("simple" | "true"), d_model, n_layers, attention_layers, vocab_size,
    d_state, d_conv, expand, dt_rank ("auto" or int), n_heads, n_kv_heads, rope, rope_theta,
    d_ff (0: no MLP), norm_eps, tie_embeddings, state_bridges, and for True Hybrid models
    true_layers, routing_mode ("both" | "soft" | "hard"), routing_granularity ("token" |
    "chunk"), routing_chunk, attention_budget, budget_loss_weight.

    Raises ValueError with config.json's message (it names the field) for an unknown field, a
    wrong type or a value out of range.
    """

    FIELDS = tuple(_DEFAULTS)

    def __init__(self, **kwargs):
        fields = dict(_DEFAULTS)
        fields.update({k: _jsonable(v) for k, v in kwargs.items()})
        self._set(fields)

    def _set(self, fields):
        try:
            text = json.dumps(fields)
        except TypeError as e:  # an object JSON cannot hold: name the field
            bad = next(k for k, v in fields.items() if not _dumps_ok(v))
            raise TypeError(f"config: '{bad}' has an unsupported type "
                            f"{type(fields[bad]).__name__}") from e
        checked = json.loads(_core.normalized_config(text))
        # The engine writes the true-hybrid fields only for hybrid "true"; keep the rest as given.
        for k in _DEFAULTS:
            v = checked.get(k, fields[k])
            if isinstance(v, float):  # the engine's float32, shown as its shortest decimal
                v = float(str(np.float32(v)))
            object.__setattr__(self, k, v)

    @classmethod
    def from_dict(cls, d):
        """A config from a dict of fields (config.json's content; "model_type" is accepted)."""
        return cls(**d)

    @classmethod
    def from_json_file(cls, path):
        """Reads and validates a config.json (errors name the file)."""
        return cls(**_strip_type(json.loads(_core.load_config(str(path)))))

    @classmethod
    def from_preset(cls, name):
        """The engine's presets: seed, mamba, transformer, true-hybrid, demo, true-demo, tiny,
        true-tiny (hm init --preset)."""
        return cls(**_strip_type(json.loads(_core.preset(name))))

    def to_dict(self):
        return {k: getattr(self, k) for k in _DEFAULTS}

    def to_json(self):
        """config.json's text as the engine writes it."""
        return _core.normalized_config(json.dumps(self.to_dict()))

    def validate(self):
        """Checks the fields again (after attributes were changed); ValueError if invalid."""
        self._set(self.to_dict())

    def num_parameters(self):
        return _core.count_params(self.to_json())

    def __eq__(self, other):
        return isinstance(other, HybridMambaConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return "HybridMambaConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"


def _dumps_ok(v):
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def _strip_type(d):
    d.pop("model_type", None)
    return d
