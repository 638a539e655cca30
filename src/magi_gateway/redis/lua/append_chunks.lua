-- Append a batch of thinking chunks to one session's log, atomically, in order: one
-- script call, one notification and one round of expiry refreshes for the whole batch.
--
-- KEYS: log seq meta pending results
-- ARGV: head channel_prefix notify_prefix agent_1 tail_1 agent_2 tail_2 ...
--   head           '{"type":"agent_judgement_stream","session_id":"…","seq":' (core/frames.py)
--   notify_prefix  "SESSION_ID\n" (core/notification.py)
-- Returns one code per chunk: its seq, or < 0: -1 gone, -2 completed,
-- -3 agent not pending (it has its final), -4 log full.
local meta = KEYS[3]
local n = (#ARGV - 3) / 2
local out = {}
if redis.call('EXISTS', meta) == 0 or redis.call('HEXISTS', meta, 'completed') == 1 then
  local code = redis.call('EXISTS', meta) == 0 and -1 or -2
  for i = 1, n do out[i] = code end
  return out
end
local max = tonumber(redis.call('HGET', meta, 'max_msgs'))
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
local pending = {}
local notes = {}
for i = 1, n do
  local agent = ARGV[2 + 2 * i]
  if pending[agent] == nil then pending[agent] = redis.call('SISMEMBER', KEYS[4], agent) == 1 end
  if not pending[agent] then
    out[i] = -3
  elseif seq >= max then
    out[i] = -4
  else
    seq = seq + 1
    local frame = ARGV[1] .. seq .. ',' .. ARGV[3 + 2 * i]
    redis.call('XADD', KEYS[1], '0-' .. seq, 't', 'agent_judgement_stream', 'f', frame)
    notes[#notes + 1] = seq .. '\n' .. 'agent_judgement_stream' .. '\n' .. frame
    out[i] = seq
  end
end
if #notes > 0 then
  redis.call('SET', KEYS[2], seq)
  local ttl = redis.call('HGET', meta, 'ttl_ms')
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ttl) end
  local owner = redis.call('HGET', meta, 'owner')
  if owner and owner ~= '' then
    redis.call('PUBLISH', ARGV[2] .. owner, ARGV[3] .. table.concat(notes, '\n'))
  end
end
return out
