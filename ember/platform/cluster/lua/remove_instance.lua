-- Gone: forget an instance and free its claim (idempotent). (prefixed by lib_remove.lua)
-- KEYS: instances, devices_free; ARGV: prefix, instance id
if remove_instance(ARGV[1], ARGV[2], KEYS[1], KEYS[2]) then return 1 end
return 0
