# Type stubs of the extension module (python/src/module.cpp). The public API is hybrid_mamba's
# Python files; Tokenizer and StreamDecoder are re-exported from here.
from typing import Callable, Optional

import numpy as np
import numpy.typing as npt

TASK_TEST_SEED: int

def set_num_threads(n: int) -> None: ...
def num_threads() -> int: ...
def normalized_config(json: str) -> str: ...
def default_config() -> str: ...
def preset(name: str) -> str: ...
def preset_names() -> list[str]: ...
def count_params(config_json: str) -> int: ...
def load_config(path: str) -> str: ...

class Tokenizer:
    """A checkpoint's tokenizer: byte-level, SentencePiece BPE or a Hugging Face tokenizer.json
    (src/runtime/tokenizer.h). more_eos: further stop tokens (eos_token_id lists)."""
    @staticmethod
    def load(dir: str) -> "Tokenizer":
        """Reads dir/tokenizer.json (and tokenizer.model)."""
    @staticmethod
    def byte() -> "Tokenizer":
        """Byte-level: ids 0-255 are bytes, 256 <bos>, 257 <eos>, 258 <pad>."""
    @staticmethod
    def train_bpe(texts: list[str], vocab_size: int, out_dir: str) -> "Tokenizer":
        """Trains a byte-fallback BPE model on texts (deterministic), saves it in out_dir."""
    @property
    def type(self) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def bos(self) -> int: ...
    @property
    def eos(self) -> int: ...
    @property
    def more_eos(self) -> list[int]: ...
    @property
    def pad(self) -> int: ...
    def encode(self, text: str, add_bos: bool = True) -> npt.NDArray[np.int32]: ...
    def decode(self, ids: list[int]) -> str:
        """Text as hm generate prints it: U+FFFD for bytes that cannot form a character."""
    def decode_bytes(self, ids: list[int]) -> bytes: ...
    def save(self, dir: str) -> None: ...

class StreamDecoder:
    """Tokens to text as they arrive; holds back a character cut between tokens."""
    def __init__(self, tokenizer: Tokenizer) -> None: ...
    def push(self, id: int) -> str: ...
    def flush(self) -> str: ...

class SamplingParams:
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    seed: int

class Stream:
    """generate_stream's engine side: one decode step per next(), in the caller's thread."""
    def next(self) -> list[tuple[int, int]]: ...
    def stop(self, seq: int) -> None: ...
    @property
    def stats(self) -> dict: ...

class Model:
    @staticmethod
    def from_config(config_json: str, seed: int = 0, device: str = "cpu", dtype: str = "") -> "Model": ...
    @staticmethod
    def from_dir(path: str, device: str = "cpu", dtype: str = "") -> "Model": ...
    def save(self, dir: str, dtype: str = "F32") -> None: ...
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def config_json(self) -> str: ...
    @property
    def n_params(self) -> int: ...
    @property
    def tokenizer(self) -> Optional[Tokenizer]: ...
    def set_tokenizer(self, tok: Optional[Tokenizer]) -> None: ...
    def forward(self, input_ids: npt.NDArray[np.int32]) -> npt.NDArray[np.float32]: ...
    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams, eos: list[int],
                 n_decodable: int, kv_type: str, ctx: int,
                 on_token: Optional[Callable[[int, int], Optional[bool]]]) -> tuple[list[npt.NDArray[np.int32]], dict]: ...
    def stream(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams, eos: list[int],
               n_decodable: int, kv_type: str, ctx: int) -> Stream: ...
    def routing_analysis(self, tokens: list[int]) -> dict: ...
    def score_task(self, task: "TaskSpec", n: int, batch: int) -> dict: ...

class AdamWConfig:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    clip_norm: float

class Optimizer:
    def __init__(self, model: Model, config: AdamWConfig) -> None: ...
    def step(self, tokens: npt.NDArray[np.int32], targets: npt.NDArray[np.int32], lr: float) -> tuple[float, float]: ...
    @property
    def steps(self) -> int: ...

def lr_at(step: int, warmup: int, total: int, max_lr: float, min_lr: float) -> float: ...

class TaskSpec:
    name: str
    vocab: int
    seq_len: int
    kv: int

def resolve_task(spec: TaskSpec) -> TaskSpec: ...
def task_names() -> list[str]: ...
def chance_accuracy(spec: TaskSpec) -> float: ...
def task_examples(spec: TaskSpec, test: bool, seed: int, first: int, n: int) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]: ...

def cuda_available() -> bool: ...

class TrainConfig:
    preset: str
    config_file: str
    data_path: str
    out_dir: str
    tokenizer: str
    vocab: int
    steps: int
    batch: int
    seq_len: int
    grad_accum: int
    lr: float
    min_lr_ratio: float
    weight_decay: float
    clip_norm: float
    warmup: int
    threads: int
    seed: int
    eval_every: int
    save_every: int
    eval_tokens: int
    scan_chunk: int
    grad_ckpt: bool
    resume: bool
    stop_after: int
    progress: bool
    task: TaskSpec
    task_eval: int
    device: str  # "cpu" | "cuda"
    dtype: str   # "f32" | "bf16" (cuda only)

def train(config: TrainConfig, on_step: Optional[Callable[[int, int, float], object]]) -> None: ...
def evaluate(model_dir: str, data: str, seq_len: int, max_tokens: int, batch: int) -> dict: ...
def evaluate_task(model_dir: str, task: TaskSpec, n: int, batch: int) -> dict: ...

class CompareConfig:
    task: str
    data_path: str
    sizes: list[int]
    seq_lens: list[int]
    lrs: list[float]
    archs: list[str]
    budget: int
    batch: int
    task_vocab: int
    kv: int
    test_examples: int
    eval_tokens: int
    out_dir: str
    threads: int
    seed: int
    progress: bool

def arch_names() -> list[str]: ...
def compare(config: CompareConfig) -> tuple[list[dict], str]: ...
