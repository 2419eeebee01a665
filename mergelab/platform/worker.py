"""``mergelab worker CAMPAIGN.yaml``: attach to a campaign's shared Optuna study and work trials until its budget is
spent (docker-compose's ``worker`` service; several processes or machines on one study).

Every worker opens the same study (``load_if_exists``) in the shared Optuna storage (``MERGELAB_OPTUNA_STORAGE``,
PostgreSQL in the compose topology) and the same MLflow campaign run (``MLFLOW_TRACKING_URI``), samples with a seed
salted by its process id (so two workers never propose the same startup trials), and stops when the study holds
``budget.n_trials`` trials. A worker that dies mid-trial stops heart-beating; the next worker to start a trial fails
the stale trial in Optuna and its MLflow run (``fail_stale_trials`` + the stale-trial callback).

A worker has no ``fresh`` (``--fresh``), by design: workers start together (compose's replicas) on a study they share,
and a worker that deleted it at its start would throw away the trials the others had begun, once per worker. A study
whose objective or search space changed is refused with a pointer to the one command that starts over,
``mergelab campaign CONFIG --fresh`` (with ``--n-trials 0`` it resets the study and the campaign run without working a
trial); the workers then attach to the new study.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mergelab.platform.campaign import CampaignResult, run_campaign
from mergelab.platform.campaign_config import load_campaign
from mergelab.platform.store import Store


def run_worker(config: str | os.PathLike[str], *, n_trials: int | None = None, summarize: bool = True,
               store: Store | None = None, **campaign_kwargs: Any) -> CampaignResult:
    """Work trials of the campaign in ``config`` until the study's budget (or ``n_trials`` here) is spent.

    Args:
        config: the campaign YAML.
        n_trials: stop this worker after this many trials.
        summarize: refresh the parent run's summary (table, plots, best trial) when this worker stops; the parent is
            set FINISHED only when no trial is still running elsewhere.
        store: override the store (default: the YAML's ``tracking`` section and the environment).
        **campaign_kwargs: passed to :func:`~mergelab.platform.campaign.run_campaign` (``evaluator``, ``merge_fn``).

    Returns:
        The :class:`~mergelab.platform.campaign.CampaignResult` as seen by this worker when it stops.
    """
    cfg = load_campaign(Path(config))
    return run_campaign(cfg, store=store, n_trials=n_trials, summarize=summarize, worker=True, **campaign_kwargs)
