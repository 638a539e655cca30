-- Move legacy responses, oldest first, into the bridge's processing list.
-- KEYS: stream_list final_list processing   ARGV: pop_command max ttl_ms final_tag
local moved, max = 0, tonumber(ARGV[2])
while moved < max do
  local item = redis.call(ARGV[1], KEYS[1])
  if not item then break end
  redis.call('LPUSH', KEYS[3], item)
  moved = moved + 1
end
-- Finals only once no chunk waits: every chunk pushed before a final is then ahead of it.
if redis.call('LLEN', KEYS[1]) == 0 then
  while moved < max do
    local item = redis.call(ARGV[1], KEYS[2])
    if not item then break end
    redis.call('LPUSH', KEYS[3], ARGV[4] .. item)
    moved = moved + 1
  end
end
if moved > 0 then redis.call('PEXPIRE', KEYS[3], ARGV[3]) end
return moved
