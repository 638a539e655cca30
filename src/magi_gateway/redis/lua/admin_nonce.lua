-- Record an admin command's nonce, by Redis's clock (one clock for every instance).
--
-- KEYS: the nonce's key
-- ARGV: ttl_ms
-- Returns the milliseconds since the nonce was first seen: 0 for its first sighting.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local first = redis.call('GET', KEYS[1])
if not first then
  redis.call('SET', KEYS[1], now, 'PX', ARGV[1])
  return 0
end
return now - tonumber(first)
