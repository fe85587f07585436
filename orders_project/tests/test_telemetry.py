"""The web's request spans keep no query string (orders_project.telemetry._path_only), under
the old and the stable HTTP semantic conventions. In process, with the SDK's own spans."""

from types import SimpleNamespace

from opentelemetry.sdk.trace import TracerProvider

from orders_project.telemetry import _path_only

QUERY = "q=customer@example.com"


def test_a_request_span_names_its_path_without_the_query_under_either_convention() -> None:
    tracer = TracerProvider().get_tracer(__name__)
    old = {"http.target": f"/admin/orders/order/?{QUERY}", "http.url": f"http://shop/admin/orders/order/?{QUERY}"}
    stable = {"url.path": "/admin/orders/order/", "url.query": QUERY, "url.full": f"http://shop/admin/?{QUERY}"}
    request = SimpleNamespace(path="/admin/orders/order/")

    for attributes in (old, stable, old | stable):
        span = tracer.start_span("GET", attributes=attributes)
        _path_only(span, request)
        span.end()
        assert QUERY not in str(dict(span.attributes)), dict(span.attributes)
        assert set(span.attributes) == set(attributes)  # nothing added, nothing left out
