-- Eviction to make room: gone at once, only for a ready instance with no outstanding request
-- (checked in the same script, so a request cannot take it in between). (prefixed by lib_remove.lua)
-- KEYS: instance, instances, devices_free; ARGV: prefix, instance id
local g = redis.call('HMGET', KEYS[1], 'state', 'outstanding')
if g[1] ~= 'ready' or (tonumber(g[2]) or 0) > 0 then return 0 end
remove_instance(ARGV[1], ARGV[2], KEYS[2], KEYS[3])
return 1
