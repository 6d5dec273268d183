-- wrk script: POST /v1/orders with a valid body (and a unique Idempotency-Key once required).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local counter = 0
request = function()
  counter = counter + 1
  wrk.headers["Idempotency-Key"] = string.format("bench-%d-%d-%d", os.time(), math.random(1, 1e9), counter)
  return wrk.format(nil, "/v1/orders",  nil,
    '{"customer_id":"bench","currency":"EUR","items":[{"sku":"SKU-1","quantity":2,"unit_price_minor":1250}]}')
end
