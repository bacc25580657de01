"""Load test of the search service: a real server on loopback, many clients, restart checks.

`python -m loadtest --duration 60 --clients 16` (or `make loadtest`); see loadtest/run.py.
"""
