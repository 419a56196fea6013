-- ready -> draining: no new request is routed to the instance; its claim stays booked until the
-- worker has dropped it (the worker then removes it). Without force, only an instance with no
-- outstanding request drains (keep-alive: never take an instance from a request that just got it).
-- A claimed/loading instance is never drained: with force it is removed (its worker drops the
-- load when mark_ready finds it gone).  (prefixed by lib_remove.lua)
-- KEYS: instance, instances, devices_free; ARGV: prefix, instance id, force ("1"/"0"), now
-- Returns "draining", "removed" or the state that made it refuse ("" when gone).
local g = redis.call('HMGET', KEYS[1], 'state', 'outstanding')
if not g[1] then return '' end
if g[1] == 'draining' then return 'draining' end
local force = ARGV[3] == '1'
if g[1] == 'ready' then
  if (tonumber(g[2]) or 0) > 0 and not force then return 'busy' end
  redis.call('HSET', KEYS[1], 'state', 'draining', 'draining_since_s', ARGV[4])
  return 'draining'
end
if force then
  remove_instance(ARGV[1], ARGV[2], KEYS[2], KEYS[3])
  return 'removed'
end
return g[1]
