-- KEYS: lease; ARGV: holder, ttl_ms. Acquire the lease, or renew it for its holder.
local h = redis.call('GET', KEYS[1])
if h and h ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
