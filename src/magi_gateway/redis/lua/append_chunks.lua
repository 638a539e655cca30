-- Append runs of thinking chunks to one session's log, atomically, in order: one script
-- call and one notification for the whole batch. The session's expiries are refreshed at
-- most once a second (the meta's refreshed_ms, Redis clock), not per call: the keys live
-- ttl_ms after the last refresh, at most a second before the last chunk (ttl_ms spans the
-- deadline and the retention; finals and the completion, append.lua, refresh every time).
--
-- KEYS: log seq meta pending results viewers
-- ARGV: head channel_prefix notify_prefix agent_1 tails_1 agent_2 tails_2 ...
--   head           '{"type":"agent_judgement_stream","session_id":"…","seq":' (core/frames.py)
--   notify_prefix  "SESSION_ID\n" (core/notification.py)
--   tails_i        one run of agent_i's chunk tails (core/frames.py), joined by "\n" (compact
--                  JSON has no raw newline), so the caller sends two arguments per run
-- The batch is published once to each instance named in the viewers set (redis/viewers.py);
-- with none there, to the owner (the opening instance), as gateways before viewers expect.
-- An entry starting with a space (an event stream, which reads the log itself) names no
-- instance: it is published to no one.
-- Returns one code per chunk, runs in order: its seq, or < 0: -1 gone, -2 completed,
-- -3 agent not pending (it has its final), -4 log full.
local meta = KEYS[3]
local out = {}
local function each_tail(tails, visit)
  local pos = 1
  while true do
    local nl = string.find(tails, '\n', pos, true)
    visit(string.sub(tails, pos, (nl or 0) - 1))
    if not nl then return end
    pos = nl + 1
  end
end
local m = redis.call('HMGET', meta, 'appid', 'completed', 'max_msgs', 'ttl_ms', 'owner', 'refreshed_ms')
local refused = (not m[1] and -1) or (m[2] and -2) or nil
if refused then
  for i = 5, #ARGV, 2 do each_tail(ARGV[i], function() out[#out + 1] = refused end) end
  return out
end
local max = tonumber(m[3])
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
local head = ARGV[1]
local pending = {}
local notes = {}
for i = 4, #ARGV, 2 do
  local agent = ARGV[i]
  if pending[agent] == nil then pending[agent] = redis.call('SISMEMBER', KEYS[4], agent) == 1 end
  each_tail(ARGV[i + 1], function(tail)
    if not pending[agent] then
      out[#out + 1] = -3
    elseif seq >= max then
      out[#out + 1] = -4
    else
      seq = seq + 1
      local frame = head .. seq .. ',' .. tail
      redis.call('XADD', KEYS[1], '0-' .. seq, 't', 'agent_judgement_stream', 'f', frame)
      notes[#notes + 1] = seq .. '\nagent_judgement_stream\n' .. frame
      out[#out + 1] = seq
    end
  end)
end
if #notes > 0 then
  redis.call('SET', KEYS[2], seq, 'KEEPTTL')  -- a plain SET would drop the key's expiry
  local now = redis.call('TIME')
  local ms = now[1] * 1000 + math.floor(now[2] / 1000)
  if not m[6] or ms - tonumber(m[6]) >= 1000 then
    for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], m[4]) end
    redis.call('HSET', meta, 'refreshed_ms', ms)
  end
  local viewers = redis.call('ZRANGE', KEYS[6], 0, -1)
  if #viewers == 0 then viewers = {m[5] or ''} end
  local note, notified = nil, {['']=true}
  for _, viewer in ipairs(viewers) do
    local instance = string.match(viewer, '^%S+') or ''
    if not notified[instance] then
      notified[instance] = true
      note = note or ARGV[3] .. table.concat(notes, '\n')
      redis.call('PUBLISH', ARGV[2] .. instance, note)
    end
  end
end
return out
