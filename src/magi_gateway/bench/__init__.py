"""Benchmarks (DESIGN §9): ``magi-gateway bench relay`` and ``magi-gateway bench idle``.

Everything runs as real processes on 127.0.0.1, started and stopped by the benchmark:
an embedded Redis, one gateway (``magi-gateway serve``), one bench worker
(``magi-gateway agent bench``), the ``limit`` baseline relay (``limit``) and load
generator processes (``loadgen``). The command line is in ``commands``; this package
imports nothing itself, so the baseline and the load generators start light.
"""

from __future__ import annotations

__all__: list[str] = []
