-- Claims whose deadline passed while still claimed or loading (a gateway that died between
-- placing and loading, a load its worker never reported) are removed, and request slots whose
-- lease lapsed (a gateway that died, a release lost with a Redis restart) are dropped.
-- (prefixed by lib_remove.lua)
-- KEYS: instances, devices_free; ARGV: prefix, now. Returns the ids removed.
local p, now, out = ARGV[1], tonumber(ARGV[2]), {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local g = redis.call('HMGET', p .. 'instance:' .. id, 'state', 'deadline_s')
  if not g[1] then
    redis.call('SREM', KEYS[1], id)
  elseif (g[1] == 'claimed' or g[1] == 'loading') and (tonumber(g[2]) or 0) < now then
    remove_instance(p, id, KEYS[1], KEYS[2])
    out[#out + 1] = id
  else
    local ikey = p .. 'instance:' .. id
    local lapsed = redis.call('ZREMRANGEBYSCORE', ikey .. ':slots', '-inf', now)
    local live = redis.call('ZCARD', ikey .. ':slots')
    if lapsed > 0 or tonumber(redis.call('HGET', ikey, 'outstanding') or '0') > live then
      redis.call('HSET', ikey, 'outstanding', live)  -- outstanding counts live leases only
    end
  end
end
return out
