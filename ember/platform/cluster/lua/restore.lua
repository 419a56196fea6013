-- A worker re-asserts an instance it holds, with its real state (after a Redis restart or after
-- its node was reaped): recorded and claimed unless the record is there, whose state then
-- follows the worker (never back to loading; draining stays draining). Returns 1 when recorded,
-- 0 when the record was there, -1 when the device is not registered (nothing recorded).
-- The request slots of the streams the instance still serves come back with it (leases ending at
-- the given expiry, renewed by the gateways holding them), so `outstanding` counts them: restored
-- at 0, the instance took new requests beyond its target concurrency, and keep-alive or eviction
-- could take it from under its streams.
-- KEYS: instance, device, instances, function instances, node instances, devices_free, instance slots
-- ARGV: instance id, nbytes, "node/device", wake channel, slot expiry_s, slot count, slot id...,
--       field, value, ...  (fields include state)
local first = 7 + tonumber(ARGV[6])
if redis.call('EXISTS', KEYS[1]) == 1 then
  local s = redis.call('HGET', KEYS[1], 'state')
  local ws = nil
  for i = first, #ARGV, 2 do if ARGV[i] == 'state' then ws = ARGV[i + 1] end end
  if ws == 'ready' and (s == 'claimed' or s == 'loading') then
    redis.call('HSET', KEYS[1], 'state', 'ready', 'deadline_s', 0)
    redis.call('PUBLISH', ARGV[4], 'ready')
  end
  return 0
end
local mem = tonumber(redis.call('HGET', KEYS[2], 'memory_bytes'))
if not mem then
  -- the device is gone (the node was deregistered since it registered): record nothing, else the
  -- instance would be routable with no bytes booked; the worker's next beat finds its node
  -- unknown and registers again, restoring it then
  return -1
end
for i = first, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('DEL', KEYS[7])
for i = 7, first - 1 do redis.call('ZADD', KEYS[7], ARGV[5], ARGV[i]) end
redis.call('HSET', KEYS[1], 'outstanding', redis.call('ZCARD', KEYS[7]))
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[1])
local n = tonumber(ARGV[2])
-- weights once per checkpoint per device, plus this instance's KV budget
local kv, ck = 0, ''
for i = first, #ARGV, 2 do
  if ARGV[i] == 'kv_bytes' then kv = tonumber(ARGV[i + 1]) elseif ARGV[i] == 'checkpoint' then ck = ARGV[i + 1] end
end
if tonumber(redis.call('HGET', KEYS[2], 'ckpt:' .. ck) or '0') > 0 then n = 0 end
n = n + kv
local claimed = redis.call('HINCRBY', KEYS[2], 'claimed_bytes', n)
redis.call('HINCRBY', KEYS[2], 'ckpt:' .. ck, 1)
redis.call('HINCRBY', KEYS[2], 'instances', 1)
redis.call('ZADD', KEYS[6], mem - claimed, ARGV[3])
redis.call('PUBLISH', ARGV[4], 'ready')
return 1
