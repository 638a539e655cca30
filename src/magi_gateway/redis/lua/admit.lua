-- Admit a new session, in the deployment's {P} slot: the appid's quota of running
-- sessions and its creation rate, then the session's deadline and its intake mark.
--
-- KEYS: deadlines running rate unqueued unqueued_due [request]
--   running  zset: the appid's running sessions, score = deadline (ms): pruned by score,
--            so a session nobody removed (its gateway died) stops counting at its deadline
--   rate     string: sessions the appid opened in the current one-second window
--   request  string (optional, one server only: another slot): the client's request_id,
--            claimed here for the session (redis.idempotency) unless it names another
-- ARGV: session_id deadline_ms ttl_ms max_running max_per_s now_ms intake repair_at_ms [claim_ttl_ms]
--   max_running / max_per_s  0: no limit; intake: the mark ('' for none)
-- Returns 1 admitted; -1 too many running sessions; -2 opened too fast; the id of the
-- session the request_id names already (nothing written).
local sid, deadline, ttl, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[6])
local max_running, max_per_s = tonumber(ARGV[4]), tonumber(ARGV[5])
local function extend(key)
  -- Shared keys: NX gives a fresh key its first expiry, GT only ever pushes it later.
  redis.call('PEXPIRE', key, ttl, 'NX')
  redis.call('PEXPIRE', key, ttl, 'GT')
end
if KEYS[6] then
  local existing = redis.call('GET', KEYS[6])
  if existing and existing ~= sid then return existing end  -- (its own: this call, re-sent)
end
if max_running > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max_running then return -1 end
end
if max_per_s > 0 then
  local opened = redis.call('INCR', KEYS[3])
  if opened == 1 then redis.call('PEXPIRE', KEYS[3], 1000) end
  if opened > max_per_s then return -2 end
end
if KEYS[6] then
  redis.call('SET', KEYS[6], sid, 'PX', ARGV[9])
end
redis.call('ZADD', KEYS[2], deadline, sid)
extend(KEYS[2])
redis.call('ZADD', KEYS[1], deadline, sid)
extend(KEYS[1])
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[4], sid, ARGV[7])
  redis.call('ZADD', KEYS[5], ARGV[8], sid)
  extend(KEYS[4])
  extend(KEYS[5])
end
return 1
