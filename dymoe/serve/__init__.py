"""``dymoe serve``: an OpenAI-compatible HTTP server over one :class:`~dymoe.engine.engine.Engine`.

The folder is the architecture: :mod:`.config` (one frozen dataclass), :mod:`.scheduler` (the FIFO
queue and the engine thread that runs one generation at a time), :mod:`.prompts` (request -> token
ids and sampling parameters), :mod:`.schemas` (pydantic request bodies), :mod:`.responses`
(OpenAI's answer and stream-chunk shapes), :mod:`.api_errors` (the OpenAI error JSON), :mod:`.metrics`
(Prometheus text), :mod:`.app` (routes) and :mod:`.server` (uvicorn). Only this package imports
FastAPI; ``pip install 'dymoe[serve]'`` brings it.
"""
