"""``dymoe serve``: an OpenAI-compatible HTTP server for one model.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (``stream: true`` as
server-sent events), GET /health, GET /metrics (Prometheus). Requests queue in arrival order and run
one at a time: batching is not implemented. Needs the serve extra: pip install 'dymoe[serve]'.
"""

from __future__ import annotations

import argparse
import signal
import sys

from dymoe.cli.options import add_model_options, generation_defaults, load_engine, open_model
from dymoe.errors import DymoeError, InputError

SERVE_PACKAGES = ("fastapi", "uvicorn", "pydantic", "starlette")
EXAMPLES = """examples:
  dymoe serve -m ~/models/Qwen3-30B-A3B --port 8000
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "Qwen3-30B-A3B", "messages": [{"role": "user", "content": "Hi"}]}'
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API", description=__doc__, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine only)")
    group.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    group.add_argument("--served-model-name", default=None,
                       help="the model id clients send (default: the checkpoint folder's name)")
    group.add_argument("--queue-timeout", type=float, default=60.0,
                       help="seconds a request may wait for the model before a 503 (default: 60)")
    group.add_argument("--max-queue", type=int, default=64, help="requests that may wait at once (default: 64)")
    group.add_argument("--max-body-bytes", type=int, default=1 << 20,
                       help="largest request body accepted (default: 1 MiB)")
    group.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.set_defaults(func=run)


def import_server():
    """The serve modules, or one line saying how to install them when the extra is missing."""
    try:
        from dymoe.serve import app, config, server
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in SERVE_PACKAGES:
            raise DymoeError(
                f"the server needs {exc.name}, which is not installed: pip install 'dymoe[serve]'"
            ) from None
        raise
    return app, config, server


def serve_config(args, config_module):
    for flag, value, low in (("--port", args.port, 0), ("--max-queue", args.max_queue, 1),
                             ("--max-body-bytes", args.max_body_bytes, 1024)):
        if value < low or (flag == "--port" and value > 65535):
            raise InputError(f"{flag} {value} is out of range")
    if not args.queue_timeout > 0:
        raise InputError(f"--queue-timeout must be > 0 seconds, got {args.queue_timeout}")
    return config_module.ServeConfig(
        model_name=args.served_model_name or args.model.resolve().name, host=args.host, port=args.port,
        queue_timeout_s=args.queue_timeout, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
        sampling_defaults=generation_defaults(args.model),
    )


def run(args) -> int:
    app_module, config_module, server_module = import_server()
    config = serve_config(args, config_module)
    checkpoint, tokenizer = open_model(args)
    server_module.bind(config.host, config.port).close()  # a taken port fails now, not after a long load
    engine = load_engine(args, checkpoint, tokenizer)
    app = app_module.create_app(engine, tokenizer, config, engine_thread=False)
    scheduler = app.state.scheduler
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM shuts down like Ctrl-C
    # HTTP on a thread, generation on this (main) thread: see Scheduler.run for the measured reason.
    with server_module.BackgroundServer(app, config.host, config.port, args.log_level, on_exit=scheduler.stop):
        print(f"dymoe serve: {config.model_name} on http://{config.host}:{config.port}/v1 "
              f"(context {engine.model.context_len} tokens, one generation at a time)", file=sys.stderr)
        scheduler.run()
    return 0
