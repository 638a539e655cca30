-- Queue a session's requests, once: whoever removes the session's intake mark (the
-- gateway that opened it, or any instance's repair sweep) writes its requests.
--
-- KEYS: unqueued unqueued_due stream...   (all in the deployment's {P} hash slot)
-- ARGV: session_id maxlen stream_ttl_ms appid user_input deadline_ms agent...
--   one agent per stream, in the same order
-- Returns 1 when this call queued the requests, 0 when another call did (or nobody must).
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 3, #KEYS do
  redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[2], '*',
    'sid', ARGV[1], 'agent', ARGV[i + 4], 'input', ARGV[5], 'deadline_ms', ARGV[6], 'appid', ARGV[4])
  redis.call('PEXPIRE', KEYS[i], ARGV[3])
end
return 1
