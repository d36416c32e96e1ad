"""See naive.py for the specification of this op."""
