-- KEYS: node, nodes, alive, devices_free
-- ARGV: prefix, node id, ttl_ms, device count, (device id, memory bytes)..., field, value, ...
-- Claims already recorded on the devices are kept, and the free-memory index follows them.
local p, n, ndev = ARGV[1], ARGV[2], tonumber(ARGV[4])
local first_field = 5 + 2 * ndev
for i = first_field, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SADD', KEYS[2], n)
redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
for i = 5, first_field - 1, 2 do
  local dkey = p .. 'device:' .. n .. '/' .. ARGV[i]
  redis.call('HSET', dkey, 'memory_bytes', ARGV[i + 1])
  redis.call('HSETNX', dkey, 'claimed_bytes', 0)
  redis.call('HSETNX', dkey, 'instances', 0)
  redis.call('HSETNX', dkey, 'busy_until_s', 0)
  local claimed = tonumber(redis.call('HGET', dkey, 'claimed_bytes'))
  redis.call('ZADD', KEYS[4], tonumber(ARGV[i + 1]) - claimed, n .. '/' .. ARGV[i])
end
return 1
