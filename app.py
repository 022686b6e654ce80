"""vicuna-demo entry point: command line + environment -> settings -> models and services -> UI -> launch.

    python app.py                       # Vicuna-7B on a GPU box; the embedded small model without one
    python app.py --help                # every flag, grouped, with its environment variable
    python app.py --self-test           # does this install answer? one chat turn per model, then exit 0 or 1
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import sys
import tempfile

from vicuna_demo.config import ConfigError, Settings, check_judge, default_model_specs, load_settings
from vicuna_demo.services.arena import parse_weights
from vicuna_demo.engines.memory import PlanError
from vicuna_demo.loading import LoadError, check_spec, cuda_available

log = logging.getLogger("vicuna_demo")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # huggingface_hub has its own console handler and also passes records on to ours: each of its
    # warnings would print twice
    from huggingface_hub.utils import logging as hub_logging
    hub_logging.disable_propagation()


def create_app(settings: Settings, engines: dict | None = None):
    """-> (gr.Blocks, Runtime). Tests pass ``engines`` to skip loading."""
    from vicuna_demo.serving import quiet_malformed_requests, stop_server_trusting_proxy_headers
    from vicuna_demo.services.runtime import build_runtime
    from vicuna_demo.ui import build_ui
    from vicuna_demo.ui.input_errors import quiet_bad_inputs

    stop_server_trusting_proxy_headers()  # the peer reaches the app as is; --forwarded-allow-ips decides
    quiet_malformed_requests()  # a crafted request gradio fails on is one console line, not a traceback
    quiet_bad_inputs()  # and so are input values gradio refuses (a path never uploaded, text for a number)
    runtime = build_runtime(settings, engines=engines)
    demo = build_ui(runtime.service, settings, runtime.banners, battles=runtime.battles, judge=runtime.judge)
    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.max_queue)
    return demo, runtime


def launch_kwargs(settings: Settings) -> dict:
    """gradio ``launch()`` arguments from the settings; raises ConfigError for a bad --auth or --forwarded-allow-ips."""
    import functools

    from starlette.middleware import Middleware

    from vicuna_demo.evaluation.questions import MAX_UPLOAD_BYTES, check_upload
    from vicuna_demo.serving import (AUTH_MESSAGE, BodyLimitMiddleware, CheckQueueJoinMiddleware,
                                      ClientAddressMiddleware, HideApiInfoBeforeLoginMiddleware, on_space,
                                      parse_auth, trusted_proxies)

    auth = parse_auth(settings.auth)
    trusted = trusted_proxies(settings, space=on_space())  # ConfigError for a bad --forwarded-allow-ips
    # the one upload: a question file for the 📋 Evaluate tab, which exists only with a judge
    questions = functools.partial(check_upload, max_chars=settings.max_input_chars) if settings.judge else None
    kwargs: dict = dict(server_name=settings.host, server_port=settings.port, share=settings.share or None,
                        # enough worker threads for --concurrency replies plus the quick events (Stop, Clear)
                        max_threads=max(40, settings.concurrency + 8),
                        # bodies capped and no upload but a checked question file; who the visitor is; no API
                        # description on the login page; crafted queue requests refused with one sentence
                        # (docs/deploy.md, "Trust rules")
                        app_kwargs={"middleware": [Middleware(BodyLimitMiddleware, check_upload=questions,
                                                              upload_bytes=MAX_UPLOAD_BYTES),
                                                   Middleware(ClientAddressMiddleware, trusted=trusted),
                                                   Middleware(HideApiInfoBeforeLoginMiddleware),
                                                   Middleware(CheckQueueJoinMiddleware)],
                                    "openapi_url": None})  # FastAPI's schema of gradio's own routes: not needed
    if auth:
        kwargs.update(auth=auth, auth_message=AUTH_MESSAGE)
    return kwargs


def serve(demo, runtime, settings: Settings, *, block: bool = True, **overrides) -> tuple[str, str | None]:
    """Warn about risky exposure, launch, explain a missing share link; -> (local URL, share URL or None).

    ``block=False`` returns once the server runs (tests); ``overrides`` replace launch arguments."""
    from vicuna_demo.serving import (asked_port, loud, on_space, port_moved_message, port_taken_message,
                                      share_failed_message, startup_warnings)
    from vicuna_demo.ui import CSS

    kwargs = {"quiet": True, "css": CSS, **launch_kwargs(settings), **overrides}
    for text in startup_warnings(settings, moderation_on=runtime.service.moderator.enabled, space=on_space()):
        print(loud(text), file=sys.stderr, flush=True)
    # gradio prints a "set share=True" hint (which contradicts --share) unless quiet, and a multi-line
    # "Could not create share link" even when quiet: the app says it in one line of its own instead.
    gradio_said = io.StringIO()
    try:
        with contextlib.redirect_stdout(gradio_said):
            _, local_url, share_url = demo.launch(prevent_thread_lock=True, **kwargs)
    except BaseException as exc:
        if isinstance(exc, OSError) and kwargs.get("server_port") and "Cannot find empty port" in str(exc):
            raise ConfigError(port_taken_message(kwargs["server_port"])) from None   # not gradio's own advice
        print(gradio_said.getvalue(), end="", flush=True)  # whatever gradio explained before failing
        raise
    log.debug("gradio's launch output: %s", gradio_said.getvalue().strip())
    moved = port_moved_message(kwargs.get("server_port") or asked_port(settings), demo.server_port)
    if moved:   # gradio took the next free port without a word
        print(moved, file=sys.stderr, flush=True)
    print(f"* Running on local URL:  {local_url}", flush=True)
    if share_url:
        print(f"* Running on public URL: {share_url}", flush=True)
    elif settings.share:
        print(share_failed_message(local_url, space=on_space()), file=sys.stderr, flush=True)
    if block:
        demo.block_thread()
    return local_url, share_url


def self_test(demo, runtime, settings: Settings) -> int:
    """``--self-test``: serve as usual, send one chat turn to each model through the page's /chat, report, stop."""
    from vicuna_demo import selftest
    from vicuna_demo.serving import parse_auth

    local_url, _ = serve(demo, runtime, settings, block=False)
    try:
        return selftest.run(local_url, runtime.service.engines, parse_auth(settings.auth))
    finally:
        demo.close()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        launch_kwargs(settings)  # a bad --auth or --forwarded-allow-ips fails now, before any model loads
        if settings.judge:  # against the models that will load (the default one too), before any does
            check_judge(settings, default_model_specs(settings, gpu=cuda_available()))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    scratch = None
    if settings.self_test:  # the same app, without a public link, its turns kept out of the real store
        scratch = tempfile.TemporaryDirectory(prefix="vicuna-demo-self-test-")
        settings = dataclasses.replace(settings, share=False, hf_dataset=None, log_dir=scratch.name, database=None)
    try:
        specs = default_model_specs(settings, gpu=cuda_available())
        for spec in specs:
            check_spec(spec)  # a bad path, device or dtype fails now, before anything loads
        # and so do --arena-weights that name no model
        parse_weights(settings.arena_weights, [s.display_name for s in specs] + [e.name for e in settings.endpoints])
        demo, runtime = create_app(settings)
    except (LoadError, ConfigError, PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        if settings.self_test:
            return self_test(demo, runtime, settings)
        serve(demo, runtime, settings)
    except ConfigError as exc:   # --port names a port that is in use
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        runtime.close()
        if scratch is not None:
            scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
