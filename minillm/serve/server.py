"""`minillm serve` put together: the loaded model, the scheduler's thread, the HTTP application and
uvicorn, on a socket bound before anything else starts (so `--port 0` picks a free port and says which).

uvicorn handles SIGINT and SIGTERM: it stops accepting connections, lets every request in flight
finish (streams too), then returns; the scheduler's thread ends after it. That is the draining a
load balancer expects when it retires a replica.
"""

import contextlib
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import MinillmError, UsageError
from ..kvcache import POOL_BLOCK_SIZE, pool_block_bytes
from ..memory import mib, touch_pages
from ..plan import MARGIN_BYTES
from ..registry import DEFAULT_MODEL, MODELS
from .app import MAX_BODY_BYTES, create_app
from .batch import BatchDecoder
from .kvpool import KVPool, PagedCache
from .metrics import Metrics
from .prefix import PrefixCache
from .protocol import ModelCard
from .scheduler import Scheduler


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 4               # sequences decoded together
    prefill_chunk: int = 64         # prompt tokens read per turn of the scheduler, between decode steps
    prefix_cache: bool = True       # keep full prompt blocks and share them between requests
    kv_pool: int | None = None      # positions the KV pool holds; None: see kv_pool()
    queue_size: int = 64            # requests that may wait; one more gets 503
    api_key: str | None = None
    alias: str | None = None        # the model's name in the API; default: the registry name or the file's stem
    max_body: int = MAX_BODY_BYTES


def model_id(runtime, alias: str | None) -> str:
    """The name the API lists and requests use: --alias, else the name the model was given by (a known
    model's registry name), else the file name without .gguf."""
    if alias:
        return alias
    spec = runtime.config.model or DEFAULT_MODEL
    return spec if spec in MODELS else Path(spec).stem


def kv_pool(runtime, options: ServeOptions) -> KVPool:
    """The KV pool: `--kv-pool` positions if given; under --mem-cap what the memory plan counted for
    it (one context) plus its headroom, less the margin the plan keeps free; otherwise room for
    `parallel` requests of the whole context each. At least one whole context, so that any request
    fits once the others are done."""
    config, ctx_size = runtime.model.config, runtime.config.ctx_size
    per_block, per_context = pool_block_bytes(config), -(-ctx_size // POOL_BLOCK_SIZE)
    plan = runtime.plan
    planned = None if plan is None else \
        dict((item, nbytes) for item, nbytes, _ in plan.lines)["KV pool"] + plan.headroom - MARGIN_BYTES
    if options.kv_pool is not None:
        n_blocks = -(-options.kv_pool // POOL_BLOCK_SIZE)
        if planned is not None and n_blocks * per_block > planned:
            raise UsageError(f"--kv-pool {options.kv_pool} takes {mib(n_blocks * per_block)}; the memory plan leaves "
                             f"{mib(planned)} for it under --mem-cap")
    else:
        n_blocks = options.parallel * per_context if planned is None else planned // per_block
    if n_blocks < per_context:
        raise MinillmError(f"the KV pool holds {n_blocks * POOL_BLOCK_SIZE} positions ({mib(n_blocks * per_block)}), less "
                           f"than one context of {ctx_size}: lower --ctx-size"
                           + (" or raise --mem-cap" if planned is not None else " or raise --kv-pool"))
    pool = KVPool(config, n_blocks, runtime.config.attention_spec(), POOL_BLOCK_SIZE,
                  PrefixCache() if options.prefix_cache else None)
    if runtime.plan is not None:
        touch_pages([pool.k, pool.v])   # resident now, as the plan counted it
    return pool


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def draining_server(app):
    """uvicorn's server for `app`, except that after SIGTERM or SIGINT, once the requests in flight are
    done, `run` just returns (uvicorn would raise the signal again, and the process would die of it
    before the scheduler is stopped)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    return DrainingServer(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))


def serve(runtime, options: ServeOptions, announce=print):
    """Serve the loaded model until SIGINT or SIGTERM, then drain the requests in flight."""
    card = ModelCard(model_id(runtime, options.alias), runtime.tokenizer, runtime.config.ctx_size, int(time.time()))
    metrics = Metrics()
    if options.prefix_cache and options.prefill_chunk % POOL_BLOCK_SIZE:
        raise UsageError(f"--ubatch-size {options.prefill_chunk} must be a multiple of the KV block size {POOL_BLOCK_SIZE} "
                         "for the prefix cache (or turn it off with --no-prefix-cache)")
    pool = kv_pool(runtime, options)
    scheduler = Scheduler(runtime, metrics, pool, options.parallel, options.queue_size, options.prefill_chunk)
    app = create_app(scheduler, card, metrics, options.api_key, options.max_body)
    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    announce(f"minillm serve: {card.id} on http://{host}:{port}/v1 ({options.parallel} parallel, context "
             f"{card.ctx_size}, KV pool {pool.n_blocks} blocks of {POOL_BLOCK_SIZE} positions = {mib(pool.nbytes)}, "
             f"prefix cache {'on' if options.prefix_cache else 'off'}; "
             f"{'API key required' if options.api_key else 'no API key'}); Ctrl-C or SIGTERM stops after the "
             "requests in flight")
    server = draining_server(app)
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()
        sock.close()
    if runtime.meter is not None:        # under --mem-cap: the peak of the whole run, against the cap
        announce(runtime.meter.measure().format())
    announce("minillm serve: stopped")


def warm_up_server(config):
    """Under --mem-cap, before the run's baseline is taken (minillm.runtime.load): run what a server
    calls and a single sequence does not (prefill into paged caches, decode steps of two sequences)
    on a tiny random model, and load uvicorn's HTTP protocol modules, so that the code this loads or
    compiles, and the heap that costs, are part of the baseline and not of the run. `config`: the
    server's RunConfig."""
    import tempfile

    import uvicorn
    from gguf import GGMLQuantizationType

    from ..runtime import load
    from ..synthetic import write_tiny
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny(Path(tmp) / "warm-up.gguf", dim=128, n_heads=4, n_kv_heads=2, context_length=64,
                          weight_type=GGMLQuantizationType.Q4_1, embedding_type=GGMLQuantizationType.Q8_0)
        tiny = load(replace(config, model=str(path), mem_cap=None, parallel=None, ctx_size=64, attention=None),
                    announce=lambda _: None)
    pool = KVPool(tiny.model.config, 8, tiny.config.attention_spec())
    pool.promise(8)
    caches = [PagedCache(pool, 64, promised=4) for _ in range(2)]
    for cache in caches:
        tiny.model.forward([3, 4, 5], cache, last_only=True)
    decoder = BatchDecoder(tiny.model)
    for token in (6, 7):
        decoder.step(caches, [token, token])
    uvicorn.Config(create_app, log_level="warning").load()     # imports the protocol modules a server runs
