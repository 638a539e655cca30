-- Append one message to a session's log, atomically: the one write path of every
-- session message (accepted, stream, final, complete).
--
-- KEYS: log seq meta pending results viewers
--       (+ 'create' on one server, pipelined after the admit script: deadlines, the
--       admission's record; no entry for the session there: nothing is written, -7)
-- ARGV: mode type head tail agent_id result_json channel_prefix notify_prefix
--       [viewer lease_ms n meta... agents...]
--   mode           'create' | 'stream' | 'final' | 'complete'
--                  ('create' writes the session, meta and pending, with its first message
--                  in one step: no session exists without its agent_judgement_accepted;
--                  ARGV[9] = the opening connection's viewer entry "INSTANCE CONNECTION"
--                  (redis/viewers.lua; '' for none), ARGV[10] = its lease (ms), ARGV[11] = n, then n meta fields and values,
--                  then the agents)
--   type           the message type, stored beside the frame and sent in the notification
--   head           the frame up to its seq, built by core/frames.py
--   tail           the frame after its seq (with the leading comma's object fields)
--   notify_prefix  "SESSION_ID\n", the notification's first line (core/notification.py)
-- The message is published once to each instance named in the viewers set (redis/viewers.py);
-- with none there, to the owner (the opening instance), as gateways before viewers expect.
-- An entry starting with a space (an event stream, which reads the log itself) names no
-- instance: it is published to no one.
-- Returns {seq, 1}; {seq, 0, agents, results, appid} after a session's last final;
-- or {code} < 0: -1 gone, -2 completed, -3 agent not pending, -4 log full, -5 still pending,
-- -6 exists already (create), -7 not admitted (create with the deadlines key).
local meta = KEYS[3]
local mode = ARGV[1]
if mode == 'create' then
  if KEYS[7] and not redis.call('ZSCORE', KEYS[7], string.sub(ARGV[8], 1, -2)) then return {-7} end
  if redis.call('EXISTS', meta) == 1 then return {-6} end
  local n = tonumber(ARGV[11])
  redis.call('HSET', meta, unpack(ARGV, 12, 11 + n))
  redis.call('SADD', KEYS[4], unpack(ARGV, 12 + n, #ARGV))
  if ARGV[9] ~= '' then
    local now = redis.call('TIME')
    redis.call('ZADD', KEYS[6], now[1] * 1000 + math.floor(now[2] / 1000) + tonumber(ARGV[10]), ARGV[9])
  end
elseif redis.call('EXISTS', meta) == 0 then return {-1}
elseif redis.call('HEXISTS', meta, 'completed') == 1 then return {-2}
elseif mode == 'stream' then
  if redis.call('SISMEMBER', KEYS[4], ARGV[5]) == 0 then return {-3} end
  local current = tonumber(redis.call('GET', KEYS[2]) or '0')
  if current >= tonumber(redis.call('HGET', meta, 'max_msgs')) then return {-4} end
elseif mode == 'final' then
  if redis.call('SREM', KEYS[4], ARGV[5]) == 0 then return {-3} end
  redis.call('HSET', KEYS[5], ARGV[5], ARGV[6])
elseif mode == 'complete' then
  if redis.call('SCARD', KEYS[4]) > 0 then return {-5} end
  redis.call('HSET', meta, 'completed', '1')
end
local seq = redis.call('INCR', KEYS[2])
local frame = ARGV[3] .. seq .. ',' .. ARGV[4]
redis.call('XADD', KEYS[1], '0-' .. seq, 't', ARGV[2], 'f', frame)
local ttl = redis.call('HGET', meta, mode == 'complete' and 'retention_ms' or 'ttl_ms')
for i = 1, 6 do redis.call('PEXPIRE', KEYS[i], ttl) end
local viewers = redis.call('ZRANGE', KEYS[6], 0, -1)
if #viewers == 0 then viewers = {redis.call('HGET', meta, 'owner') or ''} end
local notified = {['']=true}
for _, viewer in ipairs(viewers) do
  local instance = string.match(viewer, '^%S+') or ''
  if not notified[instance] then
    notified[instance] = true
    redis.call('PUBLISH', ARGV[7] .. instance, ARGV[8] .. seq .. '\n' .. ARGV[2] .. '\n' .. frame)
  end
end
if mode == 'final' and redis.call('SCARD', KEYS[4]) == 0 then
  return {seq, 0, redis.call('HGET', meta, 'agents'), redis.call('HGETALL', KEYS[5]), redis.call('HGET', meta, 'appid')}
end
return {seq, 1}
