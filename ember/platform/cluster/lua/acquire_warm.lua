-- Take a request slot (a lease: slot id -> expiry) on the least-outstanding ready instance of a
-- function below target_concurrency on a live node. Slots whose lease expired (a gateway that
-- died holding them) are dropped first, so `outstanding` counts live slots only.
-- KEYS: function instances; ARGV: prefix, target_concurrency, now, slot id, slot expiry_s, excluded ids...
local p, target, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local excluded = {}
for i = 6, #ARGV do excluded[ARGV[i]] = true end
local best, best_out = nil, nil
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local ikey = p .. 'instance:' .. id
  local f = redis.call('HMGET', ikey, 'state', 'outstanding', 'node_id')
  if f[1] == 'ready' and not excluded[id] and redis.call('EXISTS', p .. 'node:' .. f[3] .. ':alive') == 1
     and redis.call('SISMEMBER', p .. 'nodes:draining', f[3]) == 0 then
    local o = tonumber(f[2]) or 0
    local lapsed = redis.call('ZREMRANGEBYSCORE', ikey .. ':slots', '-inf', now)
    if lapsed > 0 then
      o = redis.call('HINCRBY', ikey, 'outstanding', -lapsed)
      if o < 0 then redis.call('HSET', ikey, 'outstanding', 0); o = 0 end
    end
    if o < target and (best == nil or o < best_out or (o == best_out and id < best)) then
      best, best_out = id, o
    end
  end
end
if not best then return false end
local key = p .. 'instance:' .. best
redis.call('HINCRBY', key, 'outstanding', 1)
redis.call('HSET', key, 'last_used_s', ARGV[3])
redis.call('ZADD', key .. ':slots', ARGV[5], ARGV[4])
local out = {best}
for _, v in ipairs(redis.call('HGETALL', key)) do out[#out + 1] = v end
return out
