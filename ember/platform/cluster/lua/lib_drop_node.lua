-- Library: drops node n (its instances, claims, devices, holdings); with only_if_dead, only when
-- its heartbeat key has expired (checked inside the script, so a beat cannot race the reaper).
-- A reaped node keeps its draining mark: a worker that was alive registers again under the same
-- id, and must not take new work the node scaler is draining it of. Only a deregistration (the
-- worker stopping, the node scaler terminating it) forgets the mark.
local function drop_node(p, n, only_if_dead, nodes_key, instances_key, free_key)
  local nodekey = p .. 'node:' .. n
  if only_if_dead and redis.call('EXISTS', nodekey .. ':alive') == 1 then return false end
  for _, id in ipairs(redis.call('SMEMBERS', nodekey .. ':instances')) do
    local fn = redis.call('HGET', p .. 'instance:' .. id, 'function')
    if fn then redis.call('SREM', p .. 'function:' .. fn .. ':instances', id) end
    redis.call('DEL', p .. 'instance:' .. id, p .. 'instance:' .. id .. ':slots')
    if fn then redis.call('PUBLISH', p .. 'wake:' .. fn, 'gone') end
    redis.call('SREM', instances_key, id)
  end
  redis.call('DEL', nodekey .. ':instances')
  local devs = redis.call('HGET', nodekey, 'devices')
  if devs then
    for _, d in ipairs(cjson.decode(devs)) do
      redis.call('DEL', p .. 'device:' .. n .. '/' .. d['device_id'])
      redis.call('ZREM', free_key, n .. '/' .. d['device_id'])
    end
  end
  for _, ck in ipairs(redis.call('HKEYS', nodekey .. ':holdings')) do
    redis.call('SREM', p .. 'holders:' .. ck, n)
  end
  redis.call('DEL', nodekey .. ':holdings', nodekey .. ':alive', nodekey)
  redis.call('SREM', nodes_key, n)
  if not only_if_dead then redis.call('SREM', p .. 'nodes:draining', n) end
  return true
end
