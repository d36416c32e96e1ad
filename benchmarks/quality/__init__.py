"""Quality evaluation of ProxyAttn against dense attention: synthetic long-context tasks at exact
token lengths (``tasks.py``), label-free fidelity (``fidelity.py``) and the runner (``run_eval.py``)."""
