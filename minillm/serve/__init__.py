"""`minillm serve`: many requests on one small machine, through OpenAI's HTTP API.

| module        | what                                                                              |
|---------------|-----------------------------------------------------------------------------------|
| `protocol`    | OpenAI's request and response bodies, errors in its shape                          |
| `app`         | the Starlette application: endpoints, API key, streaming by server-sent events     |
| `scheduler`   | the one thread that runs the model: admission, chunked prefill, decode steps       |
| `batch`       | one decode step for B sequences, bit for bit what each gets alone                  |
| `kvpool`      | KV memory as a pool of fixed-size blocks; a sequence's cache is its block table    |
| `prefix`      | full prompt blocks kept and shared by prompts that start alike                     |
| `metrics`     | Prometheus counters, gauges and histograms (`GET /metrics`)                        |
| `server`      | the pieces put together and run by uvicorn; draining on SIGTERM                    |

Install with `pip install 'minillm[serve]'` (Starlette, uvicorn, prometheus_client).
"""
