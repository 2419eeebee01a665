"""MergeReport: what the streaming engine did, per tensor and in total, for the platform to log.

Per tensor: the rule applied (``merge`` by the method, ``factors`` the same on raw LoRA factors (``lora_merge:
factors``), ``core`` the same on the experts' cores in core space (``lora_merge: core``), ``average``, ``base`` kept
because excluded, ``zero`` passed through because every task vector was zero, ``owner`` taken from the one expert
that changes it, ``carry`` copied from the only expert that has it; both record that expert as the tensor's
``owner``), the Frobenius norm of each expert's task vector and of the merged update ``lam * tau_m``, and the
seconds spent. Totals: bytes read and
written, wall time, peak anonymous RSS and peak GPU memory, tensor counts per rule, and the tensor accounting:
what became of every tensor of the base (``merged``, ``averaged``, ``owned``, ``copied``) and of every expert
(``merged``, ``averaged``, ``owned``, ``unchanged``, ``excluded``), so that no tensor is lost silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TensorRecord:
    """One output tensor (``owner``: the name of the expert it was taken from, rules ``owner`` and ``carry``)."""

    name: str
    rule: str
    shape: tuple[int, ...]
    expert_norms: list[float] = field(default_factory=list)
    merged_norm: float = 0.0
    seconds: float = 0.0
    owner: str | None = None


@dataclass
class MergeReport:
    """The result of :func:`mergelab.engine.run_merge`.

    Attributes:
        out: the output directory.
        method: name of the method in the method table (METHODS).
        params: the method config as a plain dict.
        policy: the resolved policy (name, default, rules).
        experts: expert paths (with names).
        device: compute device used.
        dtype: output dtype (``None`` = the base's per tensor).
        compute_dtype: math dtype.
        seed: merge seed.
        tensors: one :class:`TensorRecord` per output tensor, in write order.
        bytes_read: tensor bytes read from the base and the experts.
        bytes_written: bytes written to the output shards and index.
        wall_seconds: total wall time.
        stats_passes: streaming passes spent gathering global statistics (0 for per-tensor methods).
        peak_rss_bytes: peak anonymous RSS of the process during the merge (sampled).
        peak_gpu_bytes: ``torch.cuda.max_memory_allocated`` during the merge (0 on CPU).
        shards: output shard file names.
        copied_files: side files copied from the base (config, tokenizer, processor...).
        accounting: ``{"base": {fate: n}, "experts": {name: {fate: n}}}``: every input tensor's fate
            (:func:`mergelab.engine.plan.account`).
    """

    out: str
    method: str
    params: dict[str, Any]
    policy: dict[str, Any]
    experts: list[dict[str, Any]]
    device: str
    dtype: str | None
    compute_dtype: str
    seed: int
    tensors: list[TensorRecord] = field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    wall_seconds: float = 0.0
    stats_passes: int = 0
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0
    shards: list[str] = field(default_factory=list)
    copied_files: list[str] = field(default_factory=list)
    accounting: dict[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        """Number of tensors per rule."""
        return dict(sorted(Counter(t.rule for t in self.tensors).items()))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (per-tensor records included)."""
        d = asdict(self)
        d["counts"] = self.counts
        for t in d["tensors"]:
            t["shape"] = list(t["shape"])
        return d

    def summary(self) -> str:
        """A one-screen text summary."""
        gib = 1024**3
        lines = [
            f"merged -> {self.out}",
            f"method {self.method} {self.params}",
            f"policy {self.policy.get('name')}, device {self.device}, compute {self.compute_dtype}, "
            f"out dtype {self.dtype or 'base'}, seed {self.seed}",
            f"experts ({len(self.experts)}): " + ", ".join(str(e.get("name") or e.get("path")) for e in self.experts),
            "tensors: " + ", ".join(f"{k} {v}" for k, v in self.counts.items()) + f" (total {len(self.tensors)})",
            f"read {self.bytes_read / gib:.3f} GiB, wrote {self.bytes_written / gib:.3f} GiB in {len(self.shards)} "
            f"shard(s); wall {self.wall_seconds:.2f} s; peak RSS (anon) {self.peak_rss_bytes / gib:.3f} GiB"
            + (f"; peak GPU {self.peak_gpu_bytes / gib:.3f} GiB" if self.peak_gpu_bytes else ""),
        ]
        if self.accounting:
            acc = self.accounting
            lines.append("accounted: base " + ", ".join(f"{k} {v}" for k, v in acc.get("base", {}).items()))
            lines += [f"  expert {n}: " + ", ".join(f"{k} {v}" for k, v in c.items())
                      for n, c in acc.get("experts", {}).items()]
        if self.stats_passes:
            lines.append(f"global statistics: {self.stats_passes} streaming pass(es)")
        slow = sorted(self.tensors, key=lambda t: t.seconds, reverse=True)[:5]
        if slow and slow[0].seconds > 0:
            lines.append("slowest tensors:")
            lines += [f"  {t.seconds:8.3f} s  {t.rule:7s} {t.name} {list(t.shape)}" for t in slow]
        merged = [t for t in self.tensors if t.rule in ("merge", "average", "factors", "core")]
        if merged:
            biggest = max(merged, key=lambda t: t.merged_norm)
            lines.append(f"largest merged update: {biggest.name} |lam*tau_m|={biggest.merged_norm:.4g}")
        return "\n".join(lines)
