"""The one home of the test helpers (the fixtures and tiny models are in tests/conftest.py):

- `processes`: Baton's services and Redis as real processes, and waiting for them (health, idle workers).
- `cluster`: a cluster of real processes on fixed ports for recovery tests, and a load client that records
  what each client saw.
- `inproc`: the whole stack in this process, on one event loop in a background thread.
- `oracle`: what the outputs must equal (transformers' generate() on each prompt alone), and waiting for a
  condition.
"""
