"""Benchmarks and load tests for MiDashengLM serving (`mdl-serve bench ...`).

Modules: `common` (run metadata, fresh clips, statistics, result files), `offline`
(one vllm.LLM engine per implementation: throughput and TTFT), `suite` (runs offline
workers per implementation in subprocesses: throughput, ttft, compare), `http_load`
(OpenAI-compatible HTTP load), `load_workers` (a level over several load-generator
processes, one shared window), `server_sampling` (the server's in-flight gauges and CPU
during it), `loadtest` (YAML traffic scenarios, soak), `report`
(summary.md), `plots`, `reference` (the model authors' published numbers).
"""
