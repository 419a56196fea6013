-- KEYS: devices_free; ARGV: prefix, nbytes, count, spread ("1"/"0")
-- Returns "node/device,memory,claimed,instances,busy_until" for devices of live nodes only.
-- (prefixed by lib_node_entry.lua)
local rows = room_rows(ARGV[1], KEYS[1], ARGV[2], ARGV[3], ARGV[4])
return rows
