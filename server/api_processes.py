"""Several API processes over one engine: `mdl-serve serve --api-processes N`.

One gateway process has one event loop and one GIL. At 512 clips in flight on an H200 it
sits at one core (request bodies, base64, audio decoding, vLLM's input processing and
detokenisation) while the GPU waits (benchmarks/results/2026-12-01-h200). With N > 1 this
module's supervisor takes the shape of `vllm serve --api-server-count N`:

    supervisor (this process)
      binds the listening socket, starts vLLM's engine core(s) (launch_core_engines),
      starts N API processes (vLLM's APIServerProcessManager), then waits
    API process i (run_api_process)
      a whole gateway (create_app) whose AsyncLLM is a client of those engine cores,
      accepting on the shared socket: the kernel spreads connections over the N processes

Shared by the N processes: admission (one count in shared memory, so --max-num-seqs and
--max-queue bound the server as they do with one process) and metrics (prometheus-client's
multiprocess directory: /metrics of any process serves the sum over all of them).

Life cycle: the API processes listen at once (/health/live answers while the model loads).
SIGTERM to the supervisor is passed to every API process, each drains as one gateway does
(serve.py), and once they have exited the engine cores are stopped: exit 0. If the engine
fails to start, an engine core dies or an API process fails, everything is stopped: exit 1.
"""

import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
from dataclasses import dataclass
from multiprocessing import connection
from types import FrameType
from typing import Any

from mdlserve.server.admission import Units
from mdlserve.server.app import create_app
from mdlserve.server.engine import engine_config
from mdlserve.server.serve import FINAL_GRACE_S, configure_logging, run_gateway
from mdlserve.server.settings import Settings
from mdlserve.server.state import ApiProcess

logger = logging.getLogger("mdlserve.server")
BACKLOG = 2048  # uvicorn's default
# API processes that have not exited this long after their drain could have ended are killed.
EXIT_MARGIN_S = 10


@dataclass
class ApiTier:
    """What every API process is started with (vLLM's process manager passes it as `args`)."""

    settings: Settings
    units: Units


def listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    return sock


def run_api_process(listen_address: str, sock: socket.socket, tier: ApiTier, client_config: dict[str, Any]) -> None:
    """The body of API process `client_config["client_index"]` (started by spawn)."""
    from vllm.utils.system_utils import set_process_title

    configure_logging(tier.settings.log_level)
    index = client_config["client_index"]
    set_process_title("APIServer", str(index))  # VLLM::APIServer_<i>, as vLLM's own API processes
    logger.info("API process %d of %d on %s", index, tier.settings.api_processes, listen_address)
    app = create_app(tier.settings, api_process=ApiProcess(index, client_config, tier.units))
    sys.exit(run_gateway(app, tier.settings, [sock]))


def serve_api_processes(settings: Settings) -> int:
    """Run the supervisor until shut down; returns the process exit code."""
    from vllm.v1.engine.utils import get_engine_zmq_addresses, launch_core_engines
    from vllm.v1.executor import Executor
    from vllm.v1.metrics.prometheus import setup_multiprocess_prometheus
    from vllm.v1.utils import APIServerProcessManager, shutdown

    count = settings.api_processes
    setup_multiprocess_prometheus()  # the API processes inherit PROMETHEUS_MULTIPROC_DIR
    sock = listening_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    listen_address = f"http://{host}:{port}"
    name = settings.served_model_name
    logger.info("serving %s as %r on %s with %d API processes", settings.model, name, listen_address, count)
    units = multiprocessing.get_context("spawn").Value("q", 0)
    api_server_manager = engines = coordinator = None

    def stop_starting(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop_starting)
    signal.signal(signal.SIGINT, stop_starting)
    try:
        config = engine_config(settings, count, -1)
        gc.enable()  # paused for the start-up's imports by `mdl-serve serve` (cli.py)
        addresses = get_engine_zmq_addresses(config, count, defer_api_server_ports=True)
        # The `with` block ends with vLLM's handshake: it returns once the engine cores are up.
        with launch_core_engines(config, Executor.get_class(config), True, addresses, count) as started:
            engines, coordinator, addresses, tensor_queue = started
            api_server_manager = APIServerProcessManager(
                listen_address,
                sock,
                ApiTier(settings, units),  # type: ignore[arg-type]  # vLLM types it as its argparse namespace
                count,
                addresses.inputs,
                addresses.outputs,
                target_server_fn=run_api_process,
                stats_update_address=coordinator.get_stats_publish_address() if coordinator else None,
                tensor_queue=tensor_queue,
            )
            if any(address.endswith(":0") for address in (*addresses.inputs, *addresses.outputs)):
                addresses.inputs, addresses.outputs = api_server_manager.gather_actual_addresses()
            # Otherwise (IPC paths: one host) they are final, and the engine cores load the model
            # while the API processes still import; vLLM's own server waits for those imports.
        logger.info("engine up; %d API processes serving", count)
        return _supervise(api_server_manager.processes, _engine_processes(engines, coordinator))
    except SystemExit as exit_request:
        return exit_request.code if isinstance(exit_request.code, int) else 0
    except Exception:
        logger.exception("the engine failed to start")
        return 1
    finally:
        if api_server_manager is not None:
            shutdown(api_server_manager.processes, timeout=settings.drain_timeout + FINAL_GRACE_S + EXIT_MARGIN_S)
        if engines is not None:
            engines.shutdown()
        if coordinator is not None:
            coordinator.shutdown()
        sock.close()


def _engine_processes(engines: Any, coordinator: Any) -> list[Any]:
    processes = list(getattr(engines, "processes", []))
    if coordinator is not None:
        processes.append(coordinator.proc)
    return processes


def _supervise(api_processes: list[Any], engine_processes: list[Any]) -> int:
    """Wait until every API process has exited (after SIGTERM each drains first) or
    something died. SIGTERM and SIGINT are passed on to the API processes."""

    def pass_on(signum: int, frame: FrameType | None) -> None:
        for process in api_processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    running = {process.sentinel: process for process in api_processes}
    engine_sentinels = {process.sentinel: process for process in engine_processes}
    while running:
        for sentinel in connection.wait([*running, *engine_sentinels]):
            if sentinel in engine_sentinels:
                process = engine_sentinels[sentinel]
                logger.error("engine process %s exited (code %s): stopping", process.name, process.exitcode)
                return 1
            process = running.pop(sentinel)
            process.join()  # reaps it: exitcode is set from here on
            if process.exitcode != 0:
                logger.error("API process %s exited with code %s: stopping", process.name, process.exitcode)
                return 1
    return 0
