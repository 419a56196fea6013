-- Library shared by the snapshot scripts: node_entry(p, n, only) is one live node as
-- {node id, "tier=bps;...", holdings (only `only`'s tier unless only == ''),
--  "device_id,memory,claimed,instances,busy_until", ...} or nil when the node is dead or unknown;
-- room_rows lists devices of live nodes with at least nbytes free.
local function node_entry(p, n, only)
  local nk = p .. 'node:' .. n
  if redis.call('EXISTS', nk .. ':alive') == 0 then return nil end
  if redis.call('SISMEMBER', p .. 'nodes:draining', n) == 1 then return nil end  -- placement skips it
  local h = redis.call('HGETALL', nk)
  local devs, bw = nil, {}
  for i = 1, #h, 2 do
    if h[i] == 'devices' then devs = h[i + 1]
    elseif string.sub(h[i], 1, 3) == 'bw:' then bw[#bw + 1] = string.sub(h[i], 4) .. '=' .. h[i + 1] end
  end
  if not devs then return nil end
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
  local rows, nodes = {}, {}
  for _, m in ipairs(members) do
    local slash = string.find(m, '/', 1, true)
    if slash then
      local n = string.sub(m, 1, slash - 1)
      if redis.call('EXISTS', p .. 'node:' .. n .. ':alive') == 1
         and redis.call('SISMEMBER', p .. 'nodes:draining', n) == 0 then
        local f = redis.call('HMGET', p .. 'device:' .. m, 'memory_bytes', 'claimed_bytes', 'instances', 'busy_until_s')
        if f[1] then
          rows[#rows + 1] = m .. ',' .. f[1] .. ',' .. (f[2] or '0') .. ',' .. (f[3] or '0') .. ',' .. (f[4] or '0')
          nodes[#nodes + 1] = n
        end
      end
    end
  end
  return rows, nodes
end
