-- KEYS: node; ARGV: field, observed bytes/s, alpha
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local obs, a = tonumber(ARGV[2]), tonumber(ARGV[3])
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
local new = obs
if cur then new = (1 - a) * cur + a * obs end
redis.call('HSET', KEYS[1], ARGV[1], tostring(new))
return tostring(new)
