"""Evaluators: the paper's metrics, a task table, a generation runner, benchmark loaders and an lm-eval adapter.

```python
from mergelab.evaluators import evaluate, evaluate_path
res = evaluate(model, processor, tasks=["vqa", "geometry", "chart", "ocr", "grounding"], split="val")
res.scores, res.average, res.metrics, res.records
```

Metric names are documented in ``docs/evaluators.md``. This package never imports mlflow or optuna, and
``lm_eval`` is imported only by :mod:`mergelab.evaluators.lmeval`.
"""

from __future__ import annotations

from mergelab.evaluators.runner import EvalResult, build_prompt, evaluate, evaluate_path, generate
from mergelab.evaluators.suites import SUITES, get_suite, paper_table_row
from mergelab.evaluators.tasks import OFFLINE_TASKS, PAPER_COLUMNS, TASKS, Task, get_task

__all__ = [
    "OFFLINE_TASKS",
    "PAPER_COLUMNS",
    "SUITES",
    "TASKS",
    "EvalResult",
    "Task",
    "build_prompt",
    "evaluate",
    "evaluate_path",
    "generate",
    "get_suite",
    "get_task",
    "paper_table_row",
]
