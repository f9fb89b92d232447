-- complete.lua: store the result of an in-progress claim, if the token still owns it.
-- KEYS[1]  the record's key (<prefix><store key>), a hash
-- ARGV[1]  the owner's fencing token
-- ARGV[2]  the payload (opaque bytes)
-- ARGV[3]  ttl, in milliseconds from now: the completed record expires then
-- Returns 1 if stored; 0 if the record is absent, expired, completed, or owned by another token.
-- Registered twice: as it is, and headed by '#!lua flags=allow-oom' for payloads small enough to be written even
-- at maxmemory (the store's OOM_PAYLOAD_LIMIT); as it is, Redis refuses its HSET at maxmemory (noeviction).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'state', 'token', 'expires_at')
if r[1] ~= 'in_progress' or r[2] ~= ARGV[1] or now >= tonumber(r[3]) then
  return 0
end
local expires_at = now + tonumber(ARGV[3])
-- Times written as integers, as in claim.lua.
redis.call('HSET', KEYS[1], 'state', 'completed', 'token', '', 'payload', ARGV[2],
  'lease_expires_at', string.format('%d', now), 'expires_at', string.format('%d', expires_at))
-- Redis keeps a key while its clock is <= the expiry time; a record is gone once the clock reaches expires_at.
redis.call('PEXPIREAT', KEYS[1], string.format('%d', expires_at - 1))
return 1
