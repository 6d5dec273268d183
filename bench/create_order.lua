-- wrk script: POST /v1/orders with a valid body (and a unique Idempotency-Key once required).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local counter = 0
-- Every wrk thread runs its own Lua state with the same random sequence: number the
-- threads, or their keys collide and the service rightly answers 409 (in flight).
local threads = 0
setup = function(thread)
  threads = threads + 1
  thread:set("thread_id", threads)
end
request = function()
  counter = counter + 1
  wrk.headers["Idempotency-Key"] = string.format("bench-%d-%d-%d", os.time(), thread_id or 0, counter)
  return wrk.format(nil, "/v1/orders",  nil,
    '{"customer_id":"bench","currency":"EUR","items":[{"sku":"SKU-1","quantity":2,"unit_price_minor":1250}]}')
end
