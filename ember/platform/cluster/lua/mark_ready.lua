-- loading -> ready, and wake the function's waiting requests. A removed or draining instance is
-- never resurrected: 0 tells the worker to drop what it loaded.
-- KEYS: instance; ARGV: now, wake channel
local s = redis.call('HGET', KEYS[1], 'state')
if s == 'ready' then return 1 end
if s ~= 'claimed' and s ~= 'loading' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'ready', 'last_used_s', ARGV[1], 'deadline_s', 0)
redis.call('PUBLISH', ARGV[2], 'ready')
return 1
