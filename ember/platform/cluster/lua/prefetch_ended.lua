-- A prefetch ended at `now` (or was never delivered: the gateway could not send it): its record
-- of being in flight goes, and its source tier's queue shifts by how far off its estimated end was
-- (queue_after_load, never into the past). Only the record sent with that end is touched: a newer
-- prefetch of the checkpoint to the node keeps its own. Returns 1 if the record was there, else 0.
-- KEYS: node, prefetches in flight of the checkpoint; ARGV: now, node id, source tier, estimated end,
-- its expiry (the record's score)
local score = redis.call('ZSCORE', KEYS[2], ARGV[2])
if not score or tonumber(score) ~= tonumber(ARGV[5]) then return 0 end
redis.call('ZREM', KEYS[2], ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  local now = tonumber(ARGV[1])
  local field = 'tq:' .. ARGV[3]
  local busy = tonumber(redis.call('HGET', KEYS[1], field) or '0')
  local new = busy + (now - tonumber(ARGV[4]))
  if new < now then new = now end
  redis.call('HSET', KEYS[1], field, tostring(new))
end
return 1
