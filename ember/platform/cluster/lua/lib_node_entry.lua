-- Library shared by the snapshot scripts: node_entry(p, n, only) is one live node as
-- {node id, "tier=bps;...;tq:tier=busy_until;...", holdings (only `only`'s tier unless only == ''),
--  "device_id,memory,claimed,instances,busy_until,idle_bytes", ...} or nil when the node is dead or
-- unknown; room_rows lists devices of live nodes with at least nbytes free (same row fields).
-- idle_by_device(p, n): device id -> what evicting its ready instances with nothing outstanding
-- frees (ember.scheduler.memory.evictable_bytes): each one's KV budget, and a checkpoint's weights
-- when every instance of it on the device (the device's 'ckpt:' refcount) is idle.
local function idle_by_device(p, n)
  local out, shared = {}, {}
  for _, id in ipairs(redis.call('SMEMBERS', p .. 'node:' .. n .. ':instances')) do
    local f = redis.call('HMGET', p .. 'instance:' .. id, 'state', 'outstanding', 'device_id', 'nbytes',
                         'kv_bytes', 'checkpoint')
    if f[1] == 'ready' and (tonumber(f[2]) or 0) <= 0 and f[3] then
      out[f[3]] = (out[f[3]] or 0) + (tonumber(f[5]) or 0)
      local key = f[3] .. '/ckpt:' .. (f[6] or '')
      local s = shared[key]
      if not s then
        s = {f[3], 'ckpt:' .. (f[6] or ''), tonumber(f[4]) or 0, 0}
        shared[key] = s
      end
      s[4] = s[4] + 1
    end
  end
  for _, s in pairs(shared) do
    local held = tonumber(redis.call('HGET', p .. 'device:' .. n .. '/' .. s[1], s[2]) or '0') or 0
    if s[4] >= held then out[s[1]] = out[s[1]] + s[3] end
  end
  return out
end

local function node_entry(p, n, only)
  local nk = p .. 'node:' .. n
  if redis.call('EXISTS', nk .. ':alive') == 0 then return nil end
  if redis.call('SISMEMBER', p .. 'nodes:draining', n) == 1 then return nil end  -- placement skips it
  local h = redis.call('HGETALL', nk)
  local devs, bw = nil, {}
  for i = 1, #h, 2 do
    if h[i] == 'devices' then devs = h[i + 1]
    elseif string.sub(h[i], 1, 3) == 'bw:' then bw[#bw + 1] = string.sub(h[i], 4) .. '=' .. h[i + 1]
    elseif string.sub(h[i], 1, 3) == 'tq:' then bw[#bw + 1] = h[i] .. '=' .. h[i + 1] end
  end
  if not devs then return nil end
  local idle = idle_by_device(p, n)
  local holdings = {}
  if only == '' then
    holdings = redis.call('HGETALL', nk .. ':holdings')
  else
    local tier = redis.call('HGET', nk .. ':holdings', only)
    if tier then holdings = {only, tier} end
  end
  local entry = {n, table.concat(bw, ';'), holdings}
  for _, d in ipairs(cjson.decode(devs)) do
    local f = redis.call('HMGET', p .. 'device:' .. n .. '/' .. d['device_id'],
                         'memory_bytes', 'claimed_bytes', 'instances', 'busy_until_s')
    if f[1] then
      entry[#entry + 1] = d['device_id'] .. ',' .. f[1] .. ',' .. (f[2] or '0') .. ',' .. (f[3] or '0') .. ',' .. (f[4] or '0')
        .. ',' .. (idle[d['device_id']] or 0)
    end
  end
  return entry
end

local function room_rows(p, zkey, nbytes, count, spread)
  local members
  if spread == '1' then
    members = redis.call('ZREVRANGEBYSCORE', zkey, '+inf', nbytes, 'LIMIT', 0, count)
  else
    members = redis.call('ZRANGEBYSCORE', zkey, nbytes, '+inf', 'LIMIT', 0, count)
  end
  local rows, nodes, idle = {}, {}, {}
  for _, m in ipairs(members) do
    local slash = string.find(m, '/', 1, true)
    if slash then
      local n = string.sub(m, 1, slash - 1)
      if redis.call('EXISTS', p .. 'node:' .. n .. ':alive') == 1
         and redis.call('SISMEMBER', p .. 'nodes:draining', n) == 0 then
        local f = redis.call('HMGET', p .. 'device:' .. m, 'memory_bytes', 'claimed_bytes', 'instances', 'busy_until_s')
        if f[1] then
          if not idle[n] then idle[n] = idle_by_device(p, n) end
          rows[#rows + 1] = m .. ',' .. f[1] .. ',' .. (f[2] or '0') .. ',' .. (f[3] or '0') .. ',' .. (f[4] or '0')
            .. ',' .. (idle[n][string.sub(m, slash + 1)] or 0)
          nodes[#nodes + 1] = n
        end
      end
    end
  end
  return rows, nodes
end
