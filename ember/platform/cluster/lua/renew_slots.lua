-- A live gateway renews the leases of the slots its requests hold (only those still there).
-- KEYS: instance slots ...; ARGV: expiry_s, slot id ... (one per key)
local n = 0
for i = 1, #KEYS do n = n + redis.call('ZADD', KEYS[i], 'XX', 'CH', ARGV[1], ARGV[i + 1]) end
return n
