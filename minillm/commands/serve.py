"""`minillm serve`: an OpenAI-compatible HTTP server (minillm.serve), flags named as llama-server's."""

from .flags import add_model_flags, load_runtime, run_config

HELP = "serve the model over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions)"
EPILOG = ("Needs the serve extra: pip install 'minillm[serve]'. Any OpenAI client works: "
          "OpenAI(base_url='http://127.0.0.1:8080/v1', api_key='KEY or anything').")


def add_arguments(p):
    add_model_flags(p, generates=False, ctx_default="2048, or the model's own if smaller: prompt and answer of one request")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 opens it to the network (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=8080, help="TCP port; 0 picks a free one and prints it (default: 8080)")
    g.add_argument("-np", "--parallel", type=int, default=4, help="requests decoded together (default: 4)")
    g.add_argument("-ub", "--ubatch-size", type=int, default=64,
                   help="prompt tokens read per turn, between decode steps: larger reads prompts faster, smaller "
                        "holds up the answers being decoded for less time (default: 64)")
    g.add_argument("--kv-pool", type=int, default=None, metavar="TOKENS",
                   help="positions the KV pool holds, shared by all requests in blocks of 16; a request waits until "
                        "its prompt and max_tokens fit (default: --parallel x --ctx-size; under --mem-cap what the "
                        "memory plan leaves)")
    g.add_argument("--no-prefix-cache", action="store_true",
                   help="do not keep prompt blocks for later requests (default: kept, and shared by prompts that "
                        "start alike)")
    g.add_argument("--queue-size", type=int, default=64,
                   help="requests that may wait for a slot; beyond it the answer is 503 with Retry-After (default: 64)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: none)")
    g.add_argument("--alias", default=None,
                   help="the model's name in the API (default: the registry name, or the file name without .gguf)")


def run(args) -> int:
    from ..errors import UsageError
    from ..serve.server import ServeOptions, serve
    from .output import say
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, not {args.port}")
    refuse_kv_bits(args.kv_bits)
    if args.parallel < 1 or args.ubatch_size < 2 or args.queue_size < 1:
        raise UsageError("--parallel must be at least 1, --ubatch-size at least 2 and --queue-size at least 1")
    require_serve_extra()
    if args.mem_cap is not None:
        from ..serve.server import warm_up_server
        warm_up_server(run_config(args))
    rt = load_runtime(args)          # under --mem-cap, planned for --parallel sequences and a KV pool
    serve(rt, ServeOptions(host=args.host, port=args.port, parallel=args.parallel,
                           prefill_chunk=args.ubatch_size, prefix_cache=not args.no_prefix_cache,
                           kv_pool=args.kv_pool, queue_size=args.queue_size,
                           api_key=args.api_key, alias=args.alias), announce=say)
    return 0


def refuse_kv_bits(kv_bits: int):
    from ..errors import UsageError
    if kv_bits != 32:
        raise UsageError("minillm serve keeps keys and values as float32 blocks (its KV pool); --kv-bits does not apply")


def require_serve_extra():
    """Refuse in one line when the serve extra is not installed (the server, and its memory plan,
    need its HTTP stack)."""
    from ..errors import UsageError
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError(f"minillm serve needs the serve extra ({e.name} is missing): "
                         "pip install 'minillm[serve]'") from None
