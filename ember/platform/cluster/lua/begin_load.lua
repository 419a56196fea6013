-- claimed -> loading: the worker accepted the load; the deadline moves to now + load time
-- (heartbeats that report the load extend it). Idempotent for an instance already loading.
-- KEYS: instance; ARGV: deadline_s. Returns 1, or 0 when the instance is gone or past loading.
local s = redis.call('HGET', KEYS[1], 'state')
if s ~= 'claimed' and s ~= 'loading' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'loading', 'deadline_s', ARGV[1])
return 1
