"""Running the app: `serve` (blocking), `BackgroundServer` (a thread, for notebooks), `spark-lab serve`."""
from __future__ import annotations

import os
import socket
import threading
import time

from ..models import CATALOGUE, DEFAULT_LLM
from .app import create_app
from .config import KINDS, ServerConfig

def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "warning", ready=None) -> None:
    """Serve until interrupted. port=0 takes a free port; `ready(url)` (or a print) says which."""
    import uvicorn

    config = config or ServerConfig()
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{bound}/v1"
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level=log_level, timeout_graceful_shutdown=3,
                                           timeout_keep_alive=30))
    (ready or (lambda u: print(f"spark-lab serve: listening on {u} (Ctrl-C stops)", flush=True)))(url)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class BackgroundServer:
    """A server on a thread of this process (notebooks): `with BackgroundServer() as srv: srv.url`."""

    def __init__(self, config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        import uvicorn
        self.sock = _listen(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(create_app(config or ServerConfig()), log_level="warning",
                                                    timeout_graceful_shutdown=3))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="spark-serve")

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def cmd_serve(args) -> int:
    from ..models import resolve
    api_key = args.api_key or os.environ.get("SPARK_LAB_API_KEY") or None
    model = args.model or DEFAULT_LLM
    if model in CATALOGUE and CATALOGUE[model].kind != "llm":
        raise ValueError(f"--model {model} is {KINDS[CATALOGUE[model].kind]}; give a chat model (e.g. {DEFAULT_LLM})")
    resolve(model, "llm")                         # a missing default model is one clear line now, not a 404 later
    if getattr(args, "max_waiting", 64) < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    extra = {"parallel": args.parallel} if getattr(args, "parallel", None) else {}
    timeout = getattr(args, "timeout", 600.0)
    config = ServerConfig(default_model=model, api_key=api_key, preload=True, max_waiting=getattr(args, "max_waiting", 64),
                          timeout=timeout if timeout and timeout > 0 else None, n_ctx=getattr(args, "n_ctx", None),
                          **extra)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach this port can use it",
              flush=True)
    try:
        serve(config, args.host, args.port, log_level="info")
    except KeyboardInterrupt:
        pass
    return 0
