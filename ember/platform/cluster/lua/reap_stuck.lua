-- Claims whose deadline passed while still claimed or loading (a gateway that died between
-- placing and loading, a load its worker never reported) are removed. (prefixed by lib_remove.lua)
-- KEYS: instances, devices_free; ARGV: prefix, now. Returns the ids removed.
local p, now, out = ARGV[1], tonumber(ARGV[2]), {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local g = redis.call('HMGET', p .. 'instance:' .. id, 'state', 'deadline_s')
  if not g[1] then
    redis.call('SREM', KEYS[1], id)
  elseif (g[1] == 'claimed' or g[1] == 'loading') and (tonumber(g[2]) or 0) < now then
    remove_instance(p, id, KEYS[1], KEYS[2])
    out[#out + 1] = id
  end
end
return out
