-- GCRA on one bucket, timed by the server's clock, in microseconds (integers below 2^53,
-- so exact in Lua's doubles).
-- KEYS[1]: the bucket (its value: the theoretical arrival time, when it is full again).
-- ARGV: refill interval, capacity, cost, max wait (microseconds, tokens, tokens,
-- microseconds), batch (how many times the cost to take at most: as many as the bucket
-- holds, at least one; only without a wait).
-- Returns {admitted (0/1), wait, tokens left, time until full, new TAT, times the cost
-- taken}.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local batch = tonumber(ARGV[5])
local tolerance = interval * capacity

local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then
  tat = now
end
local granted = 1
if batch > 1 and max_wait == 0 then
  -- Taking k times the cost admits without a wait iff k * cost tokens are in the bucket.
  local held = math.floor((tolerance - (tat - now)) / interval)
  granted = math.max(1, math.min(batch, math.floor(held / cost)))
end
local new_tat = tat + interval * cost * granted
local wait = new_tat - tolerance - now
if wait > max_wait then
  local left = math.max(0, math.floor((tolerance - (tat - now)) / interval))
  return {0, wait, left, tat - now, tat, 0}
end
-- The key lives until the bucket is full again: an idle bucket vanishes, and a missing
-- key reads as a full bucket.
redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
  'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
local left = math.max(0, math.floor((tolerance - (new_tat - now)) / interval))
return {1, math.max(0, wait), left, new_tat - now, new_tat, granted}
