"""Environment for every test process: the unit tests, the notebooks' nbval kernels and the browser tests'
servers (each inherits it). Set here, once, before anything imports torch.

* ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads that busy-wait starve each other (and the notebook kernels) on a
  shared 2-core machine: measured 0.12 s against 6-8 s for the same step. Passive waiting changes no result.
* One OpenMP thread per core for each pytest-xdist worker (``python -m pytest -n 2``, the README's command):
  two workers with two threads each would oversubscribe a 2-core runner. The tiny models here gain nothing
  from a second thread (notebook 02: 32.1 s with two threads, 32.5 s with one), so two processes with one
  thread each finish the suite in about half the time.
* No hub downloads: tests build their models locally.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # set in each worker process before it imports this file
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
