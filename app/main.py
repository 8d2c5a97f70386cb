"""create_app(): the HTTP front end. The backbone is loaded once, in the lifespan, never at import."""

from __future__ import annotations

import asyncio
import gc
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from app.api import dashboard
from app.api import prometheus as metrics_api
from app.api.auth import Authenticator
from app.api.body_limit import BodyLimit
from app.api.errors import install_error_handlers
from app.api.input_guard import checked_input
from app.api.openai import completions, files, fine_tuning
from app.api.openai import models as openai_models
from app.api.request_id import RequestId
from app.api.routes import datasets, evaluations, health, inference, jobs, prompts
from app.config import Settings, get_settings
from app.ml.backbone import Backbone, load_backbone, materialize_backbone
from app.services.api_metrics import Metrics
from app.services.datasets import uploads
from app.services.runs import leases
from app.services.serving.serving import Serving
from app.services.serving.streams import StreamSlots
from app.services.tenancy.quotas import InferenceRateLimiter

log = logging.getLogger(__name__)

DESCRIPTION = """Prompt tuning as a service: upload a labeled dataset, train a soft prompt for a named task
on a frozen backbone, then generate or classify with any task from one loaded model.

1. `POST /v1/datasets` with a `.jsonl` or `.csv` file.
2. `POST /v1/tuning/jobs` naming the task and the dataset; follow `GET /v1/tuning/jobs/{id}`.
3. `POST /v1/classify` or `POST /v1/generate` with `task`.

Every `/v1` route takes an API key, `Authorization: Bearer KEY` (the Authorize button); keys are made with
`softprompt keys create --tenant NAME`. While no key exists, the server answers without one, but only on
the loopback interface.
"""

OPEN_NOTICE = (
    "NO API KEYS EXIST: /v1 answers without a key, as tenant 'default', to clients on the loopback interface "
    "only; everyone else gets 401. Make a key with `softprompt keys create --tenant NAME` before others use "
    "this server (`--tenant default` keeps what was made so far)."
)


def _load_default_backbone(settings: Settings) -> Backbone:
    name = settings.default_backbone
    path = materialize_backbone(name, settings.backbones[name], settings.backbone_cache_dir)
    return load_backbone(name, path, device=settings.device)


async def _reap_forever(settings: Settings) -> None:
    """Jobs and evaluations whose worker died go back to the queue from here: every API process runs
    this, and the reaper's compare-and-set updates let any number of them do it at once."""
    while True:
        await asyncio.sleep(settings.reaper_interval_s)
        for kind in (leases.JOBS, leases.EVALUATIONS):
            try:
                reaped = await asyncio.to_thread(leases.reap, settings, kind=kind)
            except Exception as error:  # the database away: try again at the next interval
                log.warning("reaper pass failed: %s", error)
                continue
            if any(vars(reaped).values()):
                log.info("reaper (%ss): %s", kind.noun, reaped)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            if not app.state.authenticator.keys_exist():
                log.warning(OPEN_NOTICE)
        except Exception as error:  # the database away at start-up: /readyz says so; requests get 503
            log.warning("could not check for API keys: %s", error)
        backbone = _load_default_backbone(settings) if settings.load_engine else None
        app.state.serving = Serving(settings, backbone, observer=app.state.metrics)
        reaper = asyncio.create_task(_reap_forever(settings)) if settings.reaper_interval_s > 0 else None
        # Everything loaded so far (modules, the model) lives as long as the process. Frozen, it is out of
        # the garbage collector's way: a full collection otherwise walks its half a million objects, about
        # 0.3 s with the event loop stopped, at a moment some request's allocations happen to choose.
        gc.freeze()
        log.info("softprompt API ready (backbone: %s)", backbone.name if backbone else "not loaded")
        yield
        if reaper is not None:
            reaper.cancel()
        app.state.serving.close()  # finish the rows already accepted, then stop the engine thread
        uploads.close_parsers()

    app = FastAPI(
        title="softprompt",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(checked_input)],  # every route's text, checked before the route runs
    )
    app.state.settings = settings
    app.state.authenticator = Authenticator(settings)
    app.state.stream_slots = StreamSlots(
        per_tenant=settings.tenant_max_event_streams, total=settings.max_event_streams
    )
    app.state.inference_limiter = InferenceRateLimiter(settings)
    app.state.metrics = Metrics(max_task_series=settings.metrics_max_task_series)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(metrics_api.RequestMetrics, metrics=app.state.metrics)
    app.add_middleware(RequestId)  # outermost: every line the request logs carries its id
    native = (datasets, jobs, evaluations, prompts, inference, health, metrics_api, dashboard)
    for module in (*native, files, fine_tuning, openai_models, completions):
        app.include_router(module.router)
    return app
