-- release.lua: drop an in-progress claim, so that a retry runs again, if the token still owns it.
-- KEYS[1]  the record's key (<prefix><store key>), a hash
-- ARGV[1]  the owner's fencing token
-- Returns 1 if released (deleted); 0 if the record is absent, expired, completed, or owned by another token.
-- It runs at maxmemory (noeviction) too: Redis does not refuse a DEL, which frees memory.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'state', 'token', 'expires_at')
if r[1] ~= 'in_progress' or r[2] ~= ARGV[1] or now >= tonumber(r[3]) then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
