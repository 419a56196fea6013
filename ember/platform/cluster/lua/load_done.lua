-- A load ended: queue_after_load (ember.scheduler.estimator) on the device's and the source tier's
-- load queues (shift by how far off the estimate was, never into the past), and the load folded
-- into the node's bw:<tier> (EWMA, alpha ARGV[4]); once per instance. See ember/platform/loadqueues.py.
-- KEYS: instance, device, node; ARGV: now, nbytes, load seconds (0: unknown), alpha, tier it really
-- loaded from ('': the tier claimed). Queues are corrected on the tier claimed, bandwidth learned on the real one.
local f = redis.call('HMGET', KEYS[1], 'tier', 'expected_end_s', 'load_done')
if not f[1] or f[3] then return 0 end
redis.call('HSET', KEYS[1], 'load_done', '1')
local now, nbytes, secs, a = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local shift = now - (tonumber(f[2]) or now)
local function fix(key, field)
  local busy = tonumber(redis.call('HGET', key, field) or '0')
  local new = busy + shift
  if new < now then new = now end
  redis.call('HSET', key, field, tostring(new))
end
if redis.call('EXISTS', KEYS[2]) == 1 then fix(KEYS[2], 'busy_until_s') end
if redis.call('EXISTS', KEYS[3]) == 1 then
  fix(KEYS[3], 'tq:' .. f[1])
  if secs > 0 and nbytes > 0 then
    local obs = nbytes / secs
    local src = f[1]
    if ARGV[5] and ARGV[5] ~= '' then src = ARGV[5] end
    local cur = tonumber(redis.call('HGET', KEYS[3], 'bw:' .. src))
    if cur and cur > 0 then obs = (1 - a) * cur + a * obs end
    redis.call('HSET', KEYS[3], 'bw:' .. src, tostring(obs))
  end
end
return 1
