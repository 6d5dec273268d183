// k6: gRPC CreateOrder with a unique idempotency-key each, every answer checked.
//   k6 run -e TARGET=127.0.0.1:50051 -e VUS=64 -e DURATION=30s tests/load/grpc-create.js
// The protos are loaded relative to this file (../../proto), or from PROTO_ROOT.
import grpc from 'k6/net/grpc';
import { check } from 'k6';

const target = __ENV.TARGET || '127.0.0.1:50051';
const client = new grpc.Client();
client.load([`${__ENV.PROTO_ROOT || "../../proto"}`], "orders/v1/orders.proto");

export const options = {
  vus: Number(__ENV.VUS || 64),
  duration: __ENV.DURATION || '30s',
  thresholds: {
    checks: ['rate==1.0'],
    grpc_req_duration: ['p(99)<100'],
  },
};

export default function () {
  if (__ITER === 0) {
    client.connect(target, { plaintext: true });
  }
  const res = client.invoke(
    'orders.v1.OrderService/CreateOrder',
    {
      customer_id: 'k6',
      currency: 'EUR',
      items: [
        { sku: 'SKU-1', quantity: 2, unit_price_minor: 1250 },
        { sku: 'SKU-2', quantity: 1, unit_price_minor: 99 },
      ],
    },
    { metadata: { 'idempotency-key': `k6-${__VU}-${__ITER}-${Date.now()}` } },
  );
  check(res, {
    'OK': (r) => r && r.status === grpc.StatusOK,
    'pending with the right total': (r) =>
      r && r.message && r.message.order && r.message.order.status === 'ORDER_STATUS_PENDING' &&
      Number(r.message.order.totalMinor) === 2599,
  });
}
