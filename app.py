"""vicuna-demo entry point: command line + environment -> settings -> models and services -> UI -> launch.

    python app.py                       # Vicuna-7B on a GPU box; the embedded small model without one
    python app.py --help                # every flag, grouped, with its environment variable
"""

from __future__ import annotations

import logging
import sys

from vicuna_demo.config import ConfigError, Settings, load_settings
from vicuna_demo.loading import LoadError

log = logging.getLogger("vicuna_demo")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def create_app(settings: Settings, engines: dict | None = None):
    """-> (gr.Blocks, Runtime). Tests pass ``engines`` to skip loading."""
    from vicuna_demo.runtime import build_runtime
    from vicuna_demo.ui import build_ui

    runtime = build_runtime(settings, engines=engines)
    demo = build_ui(runtime.service, settings, runtime.banners)
    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.max_queue)
    return demo, runtime


def launch_kwargs(settings: Settings) -> dict:
    kwargs: dict = dict(server_name=settings.host, server_port=settings.port, share=settings.share or None)
    return kwargs


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        demo, runtime = create_app(settings)
    except (LoadError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        demo.launch(**launch_kwargs(settings))
    finally:
        runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
