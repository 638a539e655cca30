-- Queue a session's requests, once: whoever removes the session's intake mark (the
-- gateway that opened it, or any instance's repair sweep) writes its requests.
--
-- KEYS: unqueued unqueued_due, then per agent: stream apps   (all in the {P} slot)
--   stream  the agent's request stream for this appid (created with its group)
--   apps    the agent's appids with requests lately (score: last queued, ms)
-- ARGV: session_id maxlen stream_ttl_ms appid user_input deadline_ms now_ms active_ms
--       marked extra agent...   (one agent per key pair, in the same order)
--   marked  '1': only if the intake mark is there (and remove it); '0': regardless
--   extra   the client frame's other fields (JSON), '' when none (then no field is written)
-- Returns 1 when this call queued the requests, 0 when another call did.
if ARGV[9] == '1' then
  if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
  redis.call('ZREM', KEYS[2], ARGV[1])
end
local now = tonumber(ARGV[7])
local agent = 11
for i = 3, #KEYS, 2 do
  local stream, apps = KEYS[i], KEYS[i + 1]
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, 'workers', '0', 'MKSTREAM')
  end
  if ARGV[10] == '' then
    redis.call('XADD', stream, 'MAXLEN', '~', ARGV[2], '*',
      'sid', ARGV[1], 'agent', ARGV[agent], 'input', ARGV[5], 'deadline_ms', ARGV[6], 'appid', ARGV[4])
  else
    redis.call('XADD', stream, 'MAXLEN', '~', ARGV[2], '*',
      'sid', ARGV[1], 'agent', ARGV[agent], 'input', ARGV[5], 'deadline_ms', ARGV[6], 'appid', ARGV[4],
      'extra', ARGV[10])
  end
  redis.call('ZADD', apps, now, ARGV[4])
  redis.call('ZREMRANGEBYSCORE', apps, '-inf', now - tonumber(ARGV[8]))
  for _, key in ipairs({stream, apps}) do redis.call('PEXPIRE', key, ARGV[3]) end
  agent = agent + 1
end
return 1
