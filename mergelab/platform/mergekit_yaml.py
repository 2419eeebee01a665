"""mergekit's merge YAML read as a mergelab recipe, with mergekit's conventions made explicit.

``mergelab merge`` accepts a mergekit configuration unchanged::

    merge_method: ties
    base_model: ckpt/base
    models:
      - model: ckpt/base                         # the base may be listed too; it is not an expert
      - model: ckpt/vqa
        parameters: {weight: 1.0, density: 0.3}
      - model: ckpt/ocr
        parameters: {weight: 0.5, density: 0.3}
    parameters: {normalize: true, lambda: 1.0, int8_mask: true}
    dtype: float32

and merges it with the mergelab method that computes what mergekit computes, in the dtype mergekit computes in
(float32: equal to 1e-6; bfloat16: bit for bit for linear and task arithmetic):

================  =========================  ==========================================================
mergekit          mergelab                   how the parameters map
================  =========================  ==========================================================
linear            weight_average             ``weight`` -> coefficients (``normalize: true``, default;
                                             ``false`` only when the weights sum to 1); the base is the
                                             first model unless ``base_model`` is given, which is averaged
                                             too (listed, or with ``parameters.weight``)
task_arithmetic   task_arithmetic            ``weight`` -> coefficients, ``lambda`` -> lam; ``normalize:
                                             true`` divides the weights by their sum
ties              ties, ``topk: exact``      ``density`` (one value for all models) -> density, ``weight``
                                             -> coefficients, ``normalize`` -> normalize, ``lambda`` -> lam
dare_ties         dare_ties, ``density: 1``  ``density`` -> ``drop_rate = 1 - density``; ``normalize``
                                             (default false)
dare_linear       dare_task_arithmetic       ``density`` -> ``drop_rate = 1 - density``
================  =========================  ==========================================================

Not equal, by construction: DARE's random masks (mergekit draws them from torch's global generator in its
executor's order, mergelab from a generator seeded per tensor by ``(seed, tensor name)``, so the masks are
reproducible but different) and DARE's rescaling (mergekit's ``rescale: true`` matches each sparsified task
vector's L1 norm to the original; mergelab divides by ``1 - drop_rate``, the paper's rescale). Both are unbiased
estimates of the same merge. ``int8_mask`` only saves memory in mergekit and is accepted and ignored.

mergekit methods without a mergelab counterpart (slerp, nuslerp, multislerp, karcher, model_stock, breadcrumbs,
della, sce, nearswap, arcee_fusion, ram, passthrough, ...) fail with one line naming them, as do per-tensor
parameter gradients or filters, ``slices``/``modules`` and ``model+lora`` references.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mergelab.engine import MergeError

#: mergekit method -> mergelab method (the methods both tools have).
MERGEKIT_METHODS: dict[str, str] = {
    "linear": "weight_average",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_ties": "dare_ties",
    "dare_linear": "dare_task_arithmetic",
}

# mergekit's per-method default for `normalize` (GeneralizedTaskArithmeticMerge.default_normalize; linear: True).
_NORMALIZE_DEFAULT = {"linear": True, "task_arithmetic": False, "ties": True, "dare_ties": False,
                      "dare_linear": False}
_MODEL_PARAMS = {"weight", "density"}
_GLOBAL_PARAMS = {"normalize", "lambda", "int8_mask", "rescale", "weight", "density"}
_IGNORED_TOP = {"tokenizer_source", "tokenizer", "chat_template"}


def is_mergekit(data: dict[str, Any]) -> bool:
    """A mergekit configuration names its method ``merge_method`` (mergelab's: ``method``)."""
    return "merge_method" in data


def _scalar(where: str, v: Any) -> Any:
    if isinstance(v, (list, dict)):
        raise MergeError(f"{where}: per-tensor gradients and filters are not supported by mergelab "
                         f"(use one value, or a mergelab policy for per-tensor choices)")
    return v


def _model_path(ref: Any, where: str) -> str:
    if isinstance(ref, dict):  # mergekit's long form {model: {path: ...}} or {path: ...}
        ref = ref.get("path", ref.get("model"))
        if isinstance(ref, dict):
            ref = ref.get("path")
    if not isinstance(ref, str) or not ref:
        raise MergeError(f"{where}: expected a model path, got {ref!r}")
    if "+" in ref:
        raise MergeError(f"{where}: 'model+lora' references are not supported; list the LoRA adapter directory "
                         f"itself as an expert (mergelab merges adapters directly)")
    return ref


def _resolve(ref: str, root: Path) -> str:
    """mergekit resolves local paths against the working directory; a path that is not there is tried next to
    the YAML file (mergelab's rule)."""
    p = Path(ref).expanduser()
    if p.is_absolute():
        return str(p)
    return str(p.absolute()) if p.exists() else str(root / p)


def from_mergekit(data: dict[str, Any], root: Path) -> dict[str, Any]:
    """Translate a mergekit configuration into mergelab recipe fields (the dict :class:`MergeConfig` validates).

    Args:
        data: the parsed mergekit YAML.
        root: the YAML file's directory (for relative paths that do not exist under the working directory).

    Returns:
        ``{"base", "experts", "method", "params", "policy", "dtype", "compute_dtype"}``; ``policy`` is ``[]``
        (every tensor merged, as mergekit does); ``compute_dtype`` is mergekit's ``dtype`` for the task-arithmetic
        family (which computes in it) and float32 for linear (which always does).

    Raises:
        MergeError: an unsupported method, feature or parameter (one line naming it).
    """
    mk_method = data["merge_method"]
    if mk_method not in MERGEKIT_METHODS:
        raise MergeError(f"merge_method: mergekit method {mk_method!r} has no mergelab equivalent; "
                         f"from mergekit configs mergelab runs {sorted(MERGEKIT_METHODS)}")
    for key in ("slices", "modules"):
        if data.get(key):
            raise MergeError(f"{key}: mergekit {key} (layer surgery) are not supported by mergelab")
    unknown = sorted(set(data) - {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
                     - _IGNORED_TOP)
    if unknown:
        raise MergeError(f"{unknown[0]}: unknown or unsupported mergekit field")
    glob = {k: _scalar(f"parameters.{k}", v) for k, v in (data.get("parameters") or {}).items()}
    bad = sorted(set(glob) - _GLOBAL_PARAMS)
    if bad:
        raise MergeError(f"parameters.{bad[0]}: not a parameter of mergekit's {mk_method} that mergelab supports")
    models = data.get("models") or []
    if not models:
        raise MergeError("models: a mergekit configuration needs at least one model")
    base_ref = _model_path(data["base_model"], "base_model") if data.get("base_model") else None
    if base_ref is None and mk_method != "linear":
        raise MergeError(f"base_model: mergekit's {mk_method} needs a base_model")
    paths, weights, densities = [], [], []
    for i, m in enumerate(models):
        where = f"models.{i}"
        ref = _model_path(m.get("model") if isinstance(m, dict) else m, f"{where}.model")
        params = {k: _scalar(f"{where}.parameters.{k}", v) for k, v in ((m.get("parameters") if isinstance(m, dict)
                                                                         else None) or {}).items()}
        bad = sorted(set(params) - _MODEL_PARAMS)
        if bad:
            raise MergeError(f"{where}.parameters.{bad[0]}: not a per-model parameter mergelab supports")
        if ref == base_ref and mk_method != "linear":
            continue  # mergekit's task-arithmetic family skips the base among the models
        paths.append(_resolve(ref, root))
        weights.append(float(params.get("weight", glob.get("weight", 1.0))))
        densities.append(float(params.get("density", glob.get("density", 1.0))))
    if mk_method == "linear" and base_ref is not None and base_ref not in [
            _model_path(m.get("model") if isinstance(m, dict) else m, "models") for m in models]:
        # mergekit's linear averages the base_model too; its weight can only come from the global parameters
        if "weight" not in glob:
            raise MergeError("base_model: mergekit's linear merges the base_model as well; list it under models "
                             "with a weight or set parameters.weight")
        paths.append(_resolve(base_ref, root))
        weights.append(float(glob["weight"]))
        densities.append(1.0)
    if not paths:
        raise MergeError("models: no model besides the base_model")
    normalize = bool(glob.get("normalize", _NORMALIZE_DEFAULT[mk_method]))
    lam = float(glob.get("lambda", 1.0))
    if "rescale" in glob and bool(glob["rescale"]) != mk_method.startswith("dare"):
        raise MergeError(f"parameters.rescale: {str(glob['rescale']).lower()} is not supported for {mk_method} "
                         "(mergelab rescales DARE's survivors by 1/(1-p) and never rescales a magnitude trim)")
    method = MERGEKIT_METHODS[mk_method]
    params: dict[str, Any] = {}
    if mk_method == "linear":
        if not normalize and not math.isclose(sum(weights), 1.0, rel_tol=1e-9):
            raise MergeError("parameters.normalize: linear with normalize: false is supported only when the "
                             f"weights sum to 1 (they sum to {sum(weights):g})")
        if lam != 1.0:
            raise MergeError("parameters.lambda: mergekit's linear has no lambda")
    else:
        if normalize and mk_method in ("task_arithmetic", "dare_linear"):
            total = sum(weights)
            weights = [w / total if abs(total) >= 1e-8 else w for w in weights]
        params["lam"] = lam
    if mk_method in ("ties", "dare_ties", "dare_linear"):
        if len(set(densities)) > 1:
            raise MergeError(f"models: mergelab uses one density for all models, got {sorted(set(densities))}")
        density = densities[0]
        if mk_method == "ties":
            params.update(density=min(density, 1.0), topk="exact", normalize=normalize)
        else:
            if not 0.0 < density <= 1.0:
                raise MergeError(f"models: DARE density must be in (0, 1], got {density:g}")
            params["drop_rate"] = 1.0 - density
            if mk_method == "dare_ties":
                params.update(density=1.0, normalize=normalize)
    base = base_ref if base_ref is not None else _model_path(models[0].get("model"), "models.0.model")
    experts = [{"path": p, "coefficient": w} for p, w in zip(paths, weights, strict=True)]
    dtype = data.get("out_dtype") or data.get("dtype")
    # mergekit's task-arithmetic family computes in `dtype` (the inputs are cast to it); its linear in float32
    compute = data.get("dtype") if data.get("dtype") and mk_method != "linear" else "float32"
    return {"base": _resolve(base, root), "experts": experts, "method": method, "params": params, "policy": [],
            "dtype": dtype, "compute_dtype": compute}


__all__ = ["MERGEKIT_METHODS", "from_mergekit", "is_mergekit"]
