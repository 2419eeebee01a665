"""Platform: MLflow tracking, Optuna campaigns, model registry and the CLI.

This is the only subpackage allowed to import mlflow or optuna (checked by tests/test_import_rule.py).
"""

import os

# Before any module of this package imports mlflow: no usage telemetry from a merge platform that may run offline.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
