-- KEYS: nodes, instances, devices_free; ARGV: prefix, node id (prefixed by lib_drop_node.lua)
drop_node(ARGV[1], ARGV[2], false, KEYS[1], KEYS[2], KEYS[3])
return 1
