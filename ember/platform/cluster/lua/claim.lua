-- KEYS: alive, device, instance, instances, function instances, node instances, devices_free, node,
--       nodes draining (a draining node takes nothing new)
-- ARGV: nbytes, now, estimate_s, "node/device", instance id, max_instances (0: no limit), field, value, ...
-- Returns the node's worker URL when the claim holds, 0 when the device lacks room, -1 when gone,
-- -2 when the function already has max_instances. The claim is the checkpoint's weights (nbytes)
-- once per device (refcount in the device hash field 'ckpt:<checkpoint>') + the instance's
-- KV budget (its 'kv_bytes' field).
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SISMEMBER', KEYS[9], string.match(ARGV[4], '^[^/]+')) == 1 then return -1 end
local url = redis.call('HGET', KEYS[8], 'url')
if not url then return -1 end
local mem = tonumber(redis.call('HGET', KEYS[2], 'memory_bytes'))
if not mem then return -1 end
local claimed = tonumber(redis.call('HGET', KEYS[2], 'claimed_bytes') or '0')
local n = tonumber(ARGV[1])
local max_instances = tonumber(ARGV[6])
if max_instances > 0 and redis.call('SCARD', KEYS[5]) >= max_instances then return -2 end
-- weights once per checkpoint per device, plus this instance's KV budget
local kv, ck = 0, ''
for i = 7, #ARGV, 2 do
  if ARGV[i] == 'kv_bytes' then kv = tonumber(ARGV[i + 1]) elseif ARGV[i] == 'checkpoint' then ck = ARGV[i + 1] end
end
if tonumber(redis.call('HGET', KEYS[2], 'ckpt:' .. ck) or '0') > 0 then n = 0 end
n = n + kv
if mem - claimed < n then return 0 end
claimed = redis.call('HINCRBY', KEYS[2], 'claimed_bytes', n)
redis.call('HINCRBY', KEYS[2], 'ckpt:' .. ck, 1)
redis.call('HINCRBY', KEYS[2], 'instances', 1)
local now = tonumber(ARGV[2])
redis.call('ZADD', KEYS[7], mem - claimed, ARGV[4])
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
-- load queues (ember.scheduler.estimator.queue_after_claim): the device and the node's source tier
-- are busy until the load's estimated end (the estimate includes the wait); see loadqueues.py
local done_at = now + tonumber(ARGV[3])
local tq = 'tq:' .. (redis.call('HGET', KEYS[3], 'tier') or 'remote')
if tonumber(redis.call('HGET', KEYS[2], 'busy_until_s') or '0') < done_at then
  redis.call('HSET', KEYS[2], 'busy_until_s', tostring(done_at))
end
if tonumber(redis.call('HGET', KEYS[8], tq) or '0') < done_at then redis.call('HSET', KEYS[8], tq, tostring(done_at)) end
redis.call('HSET', KEYS[3], 'expected_end_s', tostring(done_at))
redis.call('SADD', KEYS[4], ARGV[5])
redis.call('SADD', KEYS[5], ARGV[5])
redis.call('SADD', KEYS[6], ARGV[5])
redis.call('HSET', KEYS[3], 'worker_url', url)
return url
