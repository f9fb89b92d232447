-- renew.lua: extend the lease of an in-progress claim, if the token still owns it.
-- KEYS[1]  the record's key (<prefix><store key>), a hash
-- ARGV[1]  the owner's fencing token
-- ARGV[2]  lease, in milliseconds from now
-- Returns 1 if renewed; 0 if the record is absent, expired, completed, or owned by another token.
-- A stale claim (lease run out) that nobody took over still belongs to its owner.
-- Run headed by '#!lua flags=allow-oom' (Redis 7), so that a lease is kept even at maxmemory: the HSET replaces a
-- number with another.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'state', 'token', 'expires_at')
if r[1] ~= 'in_progress' or r[2] ~= ARGV[1] or now >= tonumber(r[3]) then
  return 0
end
redis.call('HSET', KEYS[1], 'lease_expires_at', string.format('%d', now + tonumber(ARGV[2])))  -- as in claim.lua
return 1
