"""The recall tasks of hm compare / hm eval --task (src/eval/tasks.h, docs/EVALUATION.md)."""
from . import _core

TEST_SEED = _core.TASK_TEST_SEED  # every test set is drawn with it, whatever the training seed


def names():
    return list(_core.task_names())


def task_spec(task, vocab=0, seq_len=0, kv=0):
    """A resolved, validated TaskSpec: task is "mqar", "copy" or "induction" (fields left 0
    take the task's defaults) or a TaskSpec. ValueError names the violated constraint."""
    if isinstance(task, _core.TaskSpec):
        s = task
    else:
        s = _core.TaskSpec()
        s.name, s.vocab, s.seq_len, s.kv = str(task), int(vocab), int(seq_len), int(kv)
    if s.seq_len <= 0:
        raise ValueError(f"task {s.name!r}: seq_len must be > 0, got {s.seq_len}")
    return _core.resolve_task(s)


def examples(task, n, split="train", first=0, seed=0, **fields):
    """Draws first .. first+n-1 of a split as (inputs, targets), int32 [n, seq_len] each; target
    -1 is not scored. split "test" always uses TEST_SEED (seed is ignored), as hm eval does."""
    spec = task_spec(task, **fields)
    if split not in ("train", "test"):
        raise ValueError(f"split must be \"train\" or \"test\", got {split!r}")
    if int(first) < 0 or int(seed) < 0:
        raise ValueError("first and seed must be >= 0")
    test = split == "test"
    return _core.task_examples(spec, test, TEST_SEED if test else int(seed), int(first), int(n))


def chance_accuracy(task, **fields):
    return _core.chance_accuracy(task_spec(task, **fields))
