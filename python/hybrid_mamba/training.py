"""Training and evaluation through the engine's trainer (hm train, hm eval, hm compare)."""
import os
import tempfile

from . import _core
from .config import HybridMambaConfig
from .tasks import task_spec

# TrainConfig fields a Trainer accepts as keywords (hm train's flags, with underscores).
_TRAIN_FIELDS = ("preset", "tokenizer", "vocab", "steps", "batch", "seq_len",
                 "grad_accum", "lr", "min_lr_ratio", "weight_decay", "clip_norm", "warmup",
                 "threads", "seed", "eval_every", "save_every", "eval_tokens", "scan_chunk",
                 "grad_ckpt", "resume", "stop_after", "progress", "task_eval", "device", "dtype")


class Trainer:
    """hm train from Python: the same loop, checkpoints (out_dir/checkpoint), train_log.csv and
    exact resume (resume=True continues where a run stopped).

        Trainer(out_dir="runs/demo", data="data/brown", preset="demo", tokenizer="bpe",
                steps=800).train(callback=lambda step, steps, loss: print(step, loss))

    data: a corpus file or folder; or task="mqar" (with task_vocab, task_kv) trains on a recall
    task instead. config: a HybridMambaConfig instead of a preset. Other keywords: hm train's
    flags (steps, batch, seq_len, lr, warmup, seed, eval_every, save_every, ...). progress=False
    silences the progress line on stderr. device="cuda" trains on the GPU (the CPU's checkpoint
    files; dtype "bf16" unless given, or "f32"), as hm train --device cuda.
    """

    def __init__(self, out_dir, data=None, config=None, task=None, task_vocab=0, task_kv=0, **kwargs):
        self.out_dir = str(out_dir)
        self._c = _core.TrainConfig()
        self._c.out_dir = self.out_dir
        self._config = config
        if config is not None and not isinstance(config, HybridMambaConfig):
            raise TypeError(f"config must be a HybridMambaConfig, got {type(config).__name__}")
        if data is not None:
            self._c.data_path = str(data)
        if task is not None:
            spec = _core.TaskSpec()
            spec.name, spec.vocab, spec.kv = str(task), int(task_vocab), int(task_kv)
            self._c.task = spec
        if kwargs.get("device") == "cuda" and "dtype" not in kwargs:
            kwargs["dtype"] = "bf16"  # hm train's default on the GPU
        for k, v in kwargs.items():
            if k not in _TRAIN_FIELDS:
                raise TypeError(f"Trainer got an unknown setting '{k}' (known: {', '.join(_TRAIN_FIELDS)})")
            try:
                setattr(self._c, k, v)
            except TypeError:
                raise TypeError(f"Trainer setting '{k}' has the wrong type: {v!r}") from None

    def train(self, callback=None):
        """Runs (or with resume=True continues) the run; callback(step, steps, loss) after each
        optimizer step. An exception in the callback (or Ctrl-C) ends the run; the last saved
        checkpoint stays for a resume. Returns the trained model (from_pretrained(out_dir))."""
        from .model import HybridMambaModel
        if self._config is None:
            _core.train(self._c, callback)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "config.json")
                with open(path, "w") as f:
                    f.write(self._config.to_json())
                self._c.config_file = path
                _core.train(self._c, callback)
        return HybridMambaModel.from_pretrained(self.out_dir)


def evaluate(model_dir, data, seq_len=0, max_tokens=-1, batch=8):
    """hm eval: validation loss and perplexity of a checkpoint on data's validation split (the
    windows hm train reports), with a unigram baseline. seq_len 0 / max_tokens -1: the training
    run's values. Returns a dict (loss, perplexity, tokens, step, unigram_loss,
    unigram_perplexity)."""
    return _core.evaluate(str(model_dir), str(data), int(seq_len), int(max_tokens), int(batch))


def evaluate_task(model_dir, task="", n=1000, batch=16, vocab=0, seq_len=0, kv=0):
    """hm eval --task: accuracy on test draws 0..n-1; fields left empty/0 come from the
    checkpoint's training run."""
    spec = _core.TaskSpec()
    spec.name, spec.vocab, spec.seq_len, spec.kv = str(task), int(vocab), int(seq_len), int(kv)
    return _core.evaluate_task(str(model_dir), spec, int(n), int(batch))


def compare(out_dir, task="mqar", sizes=(64, 128, 256), seq_lens=(64, 128, 256),
            lrs=(1e-4, 4.6e-4, 2.2e-3, 1e-2), archs=None, budget=1000, batch=64, task_vocab=512,
            kv=0, test_examples=1000, eval_tokens=65536, data=None, threads=0, seed=0,
            progress=True):
    """hm compare: trains every architecture on a task (or a corpus: task="perplexity", data=)
    at matched size and equal budget. Returns (runs, table): a list of dicts, one per run, and
    the printed table of the best lr per cell. Writes out_dir/results.{csv,json,svg}."""
    c = _core.CompareConfig()
    c.out_dir, c.task = str(out_dir), str(task)
    c.sizes, c.seq_lens, c.lrs = [int(x) for x in sizes], [int(x) for x in seq_lens], [float(x) for x in lrs]
    if archs is not None:
        c.archs = [str(a) for a in archs]
    c.budget, c.batch, c.task_vocab, c.kv = int(budget), int(batch), int(task_vocab), int(kv)
    c.test_examples, c.eval_tokens = int(test_examples), int(eval_tokens)
    if data is not None:
        c.data_path = str(data)
    c.threads, c.seed, c.progress = int(threads), int(seed), bool(progress)
    return _core.compare(c)


__all__ = ["Trainer", "evaluate", "evaluate_task", "compare", "task_spec"]
