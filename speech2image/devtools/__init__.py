"""Developer tools: not used by the service at run time, and not imported by it.

- ``cluster``: the whole distributed stack on this machine (`speech2image cluster`), the same
  processes the tests and the benchmarks start, and the throwaway Redis key prefixes and
  PostgreSQL schemas they run in.
- ``tiny_models``: tiny random-weight pipelines of every family (and LoRAs) built offline.
"""

__all__: list[str] = []
