"""GET /metrics: Prometheus exposition of the app's own registry, for operators."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request
from flask.typing import ResponseReturnValue

from ..metrics import get_metrics, render_metrics
from .identity import operators_only
from .openapi import Content, endpoint

__all__ = ["bp", "metrics"]

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
@endpoint(
    responses={
        200: Content(
            {"text/plain": {"type": "string"}, "application/openmetrics-text": {"type": "string"}},
            "Prometheus text exposition (OpenMetrics when the Accept header asks for it)",
        )
    },
    tags=("system",),
    operators=True,
    rate_limited=False,
)
@operators_only
def metrics() -> ResponseReturnValue:
    """Counters, histograms and live gauges in the Prometheus (or OpenMetrics) text format."""
    body, content_type = render_metrics(get_metrics(current_app), request.headers.get("Accept"))
    return Response(body, content_type=content_type)
