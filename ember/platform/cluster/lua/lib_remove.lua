-- Library: remove_instance(p, id, instances_key, free_key) forgets an instance (record, slots,
-- index sets) and frees its claim on the device; returns false when it was already gone.
-- The function's and node's instance sets and the device are read from the instance record.
local function remove_instance(p, id, instances_key, free_key)
  local ikey = p .. 'instance:' .. id
  local f = redis.call('HMGET', ikey, 'function', 'node_id', 'device_id', 'nbytes', 'kv_bytes', 'checkpoint')
  redis.call('DEL', ikey .. ':slots')
  redis.call('SREM', instances_key, id)
  if not f[1] then return false end
  local dkey = p .. 'device:' .. f[2] .. '/' .. f[3]
  if redis.call('EXISTS', dkey) == 1 then
    -- the KV budget always goes; the weights with the device's last instance of the checkpoint
    local free = tonumber(f[5] or '0') or 0
    local ck = 'ckpt:' .. (f[6] or '')
    if redis.call('HINCRBY', dkey, ck, -1) <= 0 then
      redis.call('HDEL', dkey, ck)
      free = free + tonumber(f[4])
    end
    local c = redis.call('HINCRBY', dkey, 'claimed_bytes', 0 - free)
    if c < 0 then redis.call('HSET', dkey, 'claimed_bytes', 0); c = 0 end
    if redis.call('HINCRBY', dkey, 'instances', -1) < 0 then redis.call('HSET', dkey, 'instances', 0) end
    local mem = tonumber(redis.call('HGET', dkey, 'memory_bytes'))
    redis.call('ZADD', free_key, mem - c, f[2] .. '/' .. f[3])
  end
  redis.call('DEL', ikey)
  redis.call('SREM', p .. 'function:' .. f[1] .. ':instances', id)
  redis.call('SREM', p .. 'node:' .. f[2] .. ':instances', id)
  redis.call('PUBLISH', p .. 'wake:' .. f[1], 'gone')
  return true
end
