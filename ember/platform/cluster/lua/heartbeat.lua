-- A worker's beat: refresh its TTL, replace its holdings, and reconcile its instances with what
-- it really holds (the worker is the source of truth for what it has loaded; Redis for draining).
-- (prefixed by lib_remove.lua)
-- KEYS: node, alive, holdings, node instances, instances, devices_free
-- ARGV: prefix, node id, ttl_ms, now, loading deadline_s, holdings count,
--       (checkpoint, tier) x holdings count, then (instance id, worker state) ...
-- Returns 0 when Redis does not know the node (register again), else
-- {1, ids Redis does not know (drop them), ids Redis has draining (unload when idle), ids removed}.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local p, n, now = ARGV[1], ARGV[2], tonumber(ARGV[4])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
local nh = tonumber(ARGV[6])
local last_holding = 6 + 2 * nh
local new = {}
for i = 7, last_holding, 2 do new[ARGV[i]] = ARGV[i + 1] end
for _, ck in ipairs(redis.call('HKEYS', KEYS[3])) do
  if not new[ck] then
    redis.call('HDEL', KEYS[3], ck)
    redis.call('SREM', p .. 'holders:' .. ck, n)
  end
end
for i = 7, last_holding, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  redis.call('SADD', p .. 'holders:' .. ARGV[i], n)
end
local reported = {}
for i = last_holding + 1, #ARGV, 2 do reported[ARGV[i]] = ARGV[i + 1] end
local draining, removed = {}, {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  local ikey = p .. 'instance:' .. id
  local g = redis.call('HMGET', ikey, 'state', 'deadline_s', 'function')
  local ws = reported[id]
  if not g[1] then
    redis.call('SREM', KEYS[4], id)
  elseif ws then
    reported[id] = nil
    if g[1] == 'draining' then
      draining[#draining + 1] = id
    elseif ws == 'ready' and (g[1] == 'claimed' or g[1] == 'loading') then
      redis.call('HSET', ikey, 'state', 'ready', 'deadline_s', 0, 'last_used_s', ARGV[4])
      redis.call('PUBLISH', p .. 'wake:' .. g[3], 'ready')
    elseif ws == 'loading' then
      redis.call('HSET', ikey, 'state', 'loading', 'deadline_s', ARGV[5])
    end
  elseif (g[1] == 'claimed' or g[1] == 'loading') and (tonumber(g[2]) or 0) >= now then
    -- a load on its way to the worker: the claim's deadline bounds it
  else
    remove_instance(p, id, KEYS[5], KEYS[6])
    removed[#removed + 1] = id
  end
end
local unknown = {}
for id, _ in pairs(reported) do unknown[#unknown + 1] = id end
return {1, unknown, draining, removed}
