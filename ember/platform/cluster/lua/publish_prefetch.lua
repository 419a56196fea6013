-- A prefetch into DRAM occupies its source tier (ssd if the node has the checkpoint there, else
-- remote) from now until its estimated end (queue_after_claim). Returns the source tier, or false
-- when the checkpoint is already in DRAM or on a GPU there, or the node is unknown.
-- KEYS: node, node holdings; ARGV: now, checkpoint, nbytes, default ssd bps, default remote bps
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local held = redis.call('HGET', KEYS[2], ARGV[2])
if held == 'dram' or held == 'gpu' then return false end
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
return src
