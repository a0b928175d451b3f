"""Worker functions for tests/test_fsdp2.py, run on every rank by ``run_distributed`` (tests/ is put on PYTHONPATH)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from lightning_memopt.callbacks.memory_report import MemoryReport
from lightning_memopt.testing.workers import fit_tiny

_REPORTS: list[MemoryReport] = []


class RecordingMemoryReport(MemoryReport):
    """A MemoryReport that lets the worker return its figures."""

    def on_fit_start(self, trainer, pl_module) -> None:
        _REPORTS.append(self)
        self.trainer, self.module = trainer, pl_module
        super().on_fit_start(trainer, pl_module)


def fit_with_memory_report(world_size: int = 1, **kwargs: Any) -> dict[str, Any]:
    spec = {"class_path": f"{__name__}.RecordingMemoryReport", "init_args": {"print_table": False}}
    out = fit_tiny(world_size=world_size, callback=spec, **kwargs)
    report = _REPORTS[-1]
    out["memory"] = asdict(report.breakdown)
    # a second trainer call on the same (already sharded) module, as `memopt fit --test_after_fit` does
    (metrics,) = report.trainer.test(report.module, datamodule=report.trainer.datamodule, verbose=False)
    out["test_acc"] = float(metrics["test_acc"])
    return out
