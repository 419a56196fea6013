-- A prefetch into DRAM is sent: it occupies its source tier (ssd if the node has the checkpoint
-- there, else remote) from now until its estimated end (queue_after_claim), and is recorded as in
-- flight to the node until prefetch_expiry_s (ember.scheduler.estimator) unless its end is reported
-- first. Returns {source tier, estimated end, expiry}, or false (nothing to send) when the checkpoint is in
-- DRAM or on a GPU there, a prefetch of it to the node is already in flight, or the node is unknown.
-- KEYS: node, node holdings, prefetches in flight of the checkpoint (sorted set: node id -> expiry)
-- ARGV: now, checkpoint, nbytes, default ssd bps, default remote bps, node id, grace seconds
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local held = redis.call('HGET', KEYS[2], ARGV[2])
if held == 'dram' or held == 'gpu' then return false end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])  -- expired records
if redis.call('ZSCORE', KEYS[3], ARGV[6]) then return false end
local src = 'remote'
if held == 'ssd' then src = 'ssd' end
local now, nbytes = tonumber(ARGV[1]), tonumber(ARGV[3])
local bw = tonumber(redis.call('HGET', KEYS[1], 'bw:' .. src))
if not bw or bw <= 0 then bw = tonumber(src == 'ssd' and ARGV[4] or ARGV[5]) end
local busy = tonumber(redis.call('HGET', KEYS[1], 'tq:' .. src) or '0')
local wait = busy - now
if wait < 0 then wait = 0 end
local done_at = now + wait + nbytes / bw
if busy < done_at then redis.call('HSET', KEYS[1], 'tq:' .. src, tostring(done_at)) end
local expires = done_at + math.max(tonumber(ARGV[7]), done_at - now)
redis.call('ZADD', KEYS[3], tostring(expires), ARGV[6])
local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[3], math.ceil(tonumber(last[2]) * 1000))  -- the set goes with its last record
return {src, tostring(done_at), tostring(expires)}
