"""Benchmark cases, one module per method: ``python -m benchmarks.cases.NAME CASE SIZE [BATCH] [SEQ]``.

Each run builds its model, times one step closure through ``benchmarks.common.run_case`` and prints one
``RESULT {json}`` line, the protocol of ``anchors_gpu.py``; ``benchmarks.harness`` runs them in suites.
"""
