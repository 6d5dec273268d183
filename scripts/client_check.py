"""Exercises a REST client generated from openapi.yaml against a live server.

Run by scripts/smoke.sh: the generated package `orders_client` must be importable. Fails
(non-zero exit) if the generated code cannot talk to the served API: the contract users
generate clients from is then broken.
"""

import sys
import uuid

from orders_client import Client
from orders_client.api.orders import cancel_order, create_order, get_order, list_orders
from orders_client.models import CreateOrderBody, CurrencyCode, LineItemBody, OrderBody, OrderStatusBody, Problem


def main(base_url: str) -> None:
    client = Client(base_url=base_url, raise_on_unexpected_status=True)
    body = CreateOrderBody(
        customer_id="client-check",
        currency=CurrencyCode.EUR,
        items=[LineItemBody(sku="GEN-1", quantity=3, unit_price_minor=100)],
    )
    key = str(uuid.uuid4())
    created = create_order.sync_detailed(client=client, body=body, idempotency_key=key)
    assert created.status_code == 201, created
    order = created.parsed
    assert isinstance(order, OrderBody) and order.total_minor == 300, order

    replay = create_order.sync_detailed(client=client, body=body, idempotency_key=key)
    assert replay.headers.get("idempotent-replayed") == "true", replay.headers
    assert replay.parsed.id == order.id

    fetched = get_order.sync(client=client, id=order.id)
    assert isinstance(fetched, OrderBody) and fetched.status == OrderStatusBody.PENDING, fetched
    page = list_orders.sync(client=client, page_size=1)
    assert [o.id for o in page.orders] == [order.id], page  # newest first
    following = list_orders.sync(client=client, page_size=100, page_token=page.next_page_token)
    assert following.orders and order.id not in [o.id for o in following.orders], following

    cancelled = cancel_order.sync(client=client, id=order.id)
    assert isinstance(cancelled, OrderBody) and cancelled.status == OrderStatusBody.CANCELLED, cancelled
    again = cancel_order.sync(client=client, id=order.id)
    assert isinstance(again, Problem) and again.type_ == "urn:problem-type:orders:invalid-state", again
    missing = get_order.sync(client=client, id=uuid.uuid4())
    assert isinstance(missing, Problem) and missing.status == 404, missing
    print("generated client: create, replay, get, list, cancel and problem responses work")


if __name__ == "__main__":
    main(sys.argv[1])
