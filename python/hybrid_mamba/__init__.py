"""hybrid_mamba: the seed's Python API (HybridMambaConfig, HybridMambaModel) on the
hybrid-mamba C++ engine. docs/PYTHON.md.

    from hybrid_mamba import HybridMambaConfig, HybridMambaModel
    config = HybridMambaConfig(d_model=512, n_layers=12, attention_layers=[3, 6, 9], vocab_size=32000)
    model = HybridMambaModel(config, use_true_hybrid=False)
    output = model.generate(np.array([[1, 2, 3, 4, 5]]), max_new_tokens=50)
"""
from . import _core, tasks
from ._core import StreamDecoder, Tokenizer
from .config import HybridMambaConfig
from .model import HybridMambaModel
from .training import Trainer, compare, evaluate, evaluate_task

__version__ = "0.1.0"


def set_num_threads(n):
    """Threads for the engine (OpenMP and OpenBLAS together); n <= 0: every hardware thread."""
    _core.set_num_threads(int(n))


def num_threads():
    return _core.num_threads()


__all__ = ["HybridMambaConfig", "HybridMambaModel", "Tokenizer", "StreamDecoder", "Trainer",
           "evaluate", "evaluate_task", "compare", "tasks", "set_num_threads", "num_threads"]
