-- KEYS: nodes, instances, devices_free; ARGV: prefix. Returns the ids of the nodes dropped.
-- (prefixed by lib_drop_node.lua)
local reaped = {}
for _, n in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if drop_node(ARGV[1], n, true, KEYS[1], KEYS[2], KEYS[3]) then reaped[#reaped + 1] = n end
end
return reaped
