-- ARGV: prefix, mode ("ids" | "holders" | "all"), checkpoint whose holdings to return ("": all),
--       then node ids ("ids") or the checkpoint whose holders to read ("holders")
-- Returns one node entry (see node_entry) per live node. (prefixed by lib_node_entry.lua)
local p, mode, only = ARGV[1], ARGV[2], ARGV[3]
local ids
if mode == 'holders' then
  ids = redis.call('SMEMBERS', p .. 'holders:' .. ARGV[4])
elseif mode == 'all' then
  ids = redis.call('SMEMBERS', p .. 'nodes')
else
  ids = {}
  for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local out = {}
for _, n in ipairs(ids) do
  local e = node_entry(p, n, only)
  if e then out[#out + 1] = e end
end
return out
