"""How the server behaves: one frozen dataclass, filled by ``dymoe serve``'s flags (or by a test)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServeConfig:
    """Limits and names of one server.

    ``queue_timeout_s`` is how long a request may wait for the model before it is answered 503 with
    ``Retry-After``; ``max_queue`` requests may wait at once (more are answered 503 at once).
    ``sampling_defaults`` fill what a request leaves out (the checkpoint's generation_config.json).
    """

    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    queue_timeout_s: float = 60.0
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    sampling_defaults: dict = field(default_factory=dict)
