-- Register one viewer of a session (a connection following it), or renew its lease.
--
-- KEYS: meta viewers (the session's, redis/keys.py)
-- ARGV: mode entry lease_ms max_viewers
--   mode         'join': refused when max_viewers others follow the session already;
--                'renew': never refused (the viewer was admitted before; it may have been
--                dropped while its instance could not reach Redis)
--   entry        "INSTANCE CONNECTION"; the score is its lease expiry (ms, Redis clock);
--                " INSTANCE CONNECTION" (a leading space) for a viewer that reads the log
--                itself (an event stream): counted the same, never published to (append.lua)
-- Viewers whose lease expired (their instance died or lost Redis) are removed first, so
-- they stop counting and stop being notified. The set expires with the session.
-- Returns 1 added, 0 there already (lease extended), -1 session gone, -2 full ('join').
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then return -1 end
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ms)
if ARGV[1] == 'join' and not redis.call('ZSCORE', KEYS[2], ARGV[2])
    and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then
  return -2
end
local added = redis.call('ZADD', KEYS[2], ms + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[2], ttl)
return added
