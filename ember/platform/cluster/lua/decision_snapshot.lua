-- What one placement decision reads, in one round trip. KEYS: devices_free
-- ARGV: prefix, checkpoint, nbytes (the claim: weights + KV budget), rows, now, sort_rows, nodes
-- Returns {holder entries, device-with-room rows (scan order), entries of the first `nodes`
-- non-holder nodes among the first `sort_rows` rows in packing order (awake, least queued,
-- least free): the nodes a remote estimate would read next. A prefetch: misses fall through.
-- (prefixed by lib_node_entry.lua)
local p, ck = ARGV[1], ARGV[2]
local holders, seen = {}, {}
for _, n in ipairs(redis.call('SMEMBERS', p .. 'holders:' .. ck)) do
  local e = node_entry(p, n, ck)
  if e then holders[#holders + 1] = e; seen[n] = true end
end
local rows, row_nodes = room_rows(p, KEYS[1], ARGV[3], ARGV[4], '0')
local now, k = tonumber(ARGV[5]), math.min(#rows, tonumber(ARGV[6]))
local order = {}
for i = 1, k do
  local mem, claimed, inst, busy = string.match(rows[i], ',(%d+),(%-?%d+),(%-?%d+),([^,]+),%d+$')
  local q = (tonumber(busy) or 0) - now
  if q < 0 then q = 0 end
  order[#order + 1] = {tonumber(inst) > 0 and 0 or 1, q, tonumber(mem) - tonumber(claimed), row_nodes[i]}
end
table.sort(order, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  if a[2] ~= b[2] then return a[2] < b[2] end
  return a[3] < b[3]
end)
local extra, wanted = {}, tonumber(ARGV[7])
for _, o in ipairs(order) do
  if #extra >= wanted then break end
  local n = o[4]
  if not seen[n] then
    seen[n] = true
    local e = node_entry(p, n, ck)
    if e then extra[#extra + 1] = e end
  end
end
return {holders, rows, extra}
