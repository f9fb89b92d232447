-- claim.lua: take a key for a lease, unless a live record holds it.
-- KEYS[1]  the record's key (<prefix><store key>), a hash
-- ARGV[1]  fingerprint of the request
-- ARGV[2]  the new owner's fencing token (drawn by the client)
-- ARGV[3]  lease, in milliseconds
-- ARGV[4]  ttl, in milliseconds
-- Returns 1 if the key was taken (absent, expired, or in progress with its lease run out: stale), or if it is
-- already held with this very token (the same claim, sent again); else the live record's fields:
-- {state, fingerprint, token, created_at, lease_expires_at, expires_at, payload}, times in ms since the epoch.
-- The clock is the server's (TIME), so that every client agrees on it.
-- At maxmemory (noeviction) a claim that would write fails with OOM; one that finds a live record still answers.
local r = redis.call('HMGET', KEYS[1], 'state', 'fingerprint', 'token', 'created_at', 'lease_expires_at',
  'expires_at', 'payload')
-- A completed record is live for as long as Redis has its key: the key expires with the record (PEXPIREAT below and
-- in complete.lua), and a key past its expiry time is never found. A replay reads no clock.
if r[1] == 'completed' then
  return r
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if r[1] and now < tonumber(r[6]) and now < tonumber(r[5]) then  -- in progress, within its lease
  if r[3] == ARGV[2] then
    return 1
  end
  return r
end
local expires_at = now + tonumber(ARGV[4])
-- Times go to Redis as strings made by string.format('%d'): the same digits Redis would write for the numbers
-- themselves (%.17g), at a fraction of the server's time (glibc's %g takes a few thousand instructions per number).
-- HSET is the first write, so that at maxmemory (noeviction) Redis refuses the claim before it changes anything:
-- a script that has written once may write on past maxmemory, and nothing new may start on a full server.
redis.call('HSET', KEYS[1], 'state', 'in_progress', 'fingerprint', ARGV[1], 'token', ARGV[2],
  'created_at', string.format('%d', now), 'lease_expires_at', string.format('%d', now + tonumber(ARGV[3])),
  'expires_at', string.format('%d', expires_at))
if r[1] then
  redis.call('HDEL', KEYS[1], 'payload')  -- of an expired record taken over (a new one has none)
end
-- Redis keeps a key while its clock is <= the expiry time; a record is gone once the clock reaches expires_at.
redis.call('PEXPIREAT', KEYS[1], string.format('%d', expires_at - 1))
return 1
