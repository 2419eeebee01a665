"""Platform: MLflow tracking, Optuna campaigns, model registry and the CLI.

This is the only subpackage allowed to import mlflow or optuna (checked by tests/test_import_rule.py).
"""
