-- A request finished: its slot lease is dropped (once: a second release or an expired lease
-- changes nothing), last_used_s = now, and, if some gateway has requests of the function waiting
-- (its marker key exists), one of them is woken. Without waiters nothing is published: every
-- gateway would otherwise read a message per request anywhere in the cluster.
-- KEYS: instance, instance slots, waiting marker; ARGV: now, slot id ("": the oldest slot), wake channel
local had = 0
if ARGV[2] == '' then
  had = #redis.call('ZPOPMIN', KEYS[2]) > 0 and 1 or 0
else
  had = redis.call('ZREM', KEYS[2], ARGV[2])
end
if had == 1 and redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HINCRBY', KEYS[1], 'outstanding', -1) < 0 then redis.call('HSET', KEYS[1], 'outstanding', 0) end
  redis.call('HSET', KEYS[1], 'last_used_s', ARGV[1])
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('PUBLISH', ARGV[3], 'slot')
end
return had
