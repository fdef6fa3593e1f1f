-- GCRA on one bucket, timed by the server's clock (after bucket.lua).
-- KEYS[1]: the bucket (its value: the theoretical arrival time, when it is full again).
-- ARGV: units of a token, units of a microsecond, capacity, cost, max wait
-- (microseconds), batch (how many times the cost to take at most: as many as the bucket
-- holds, at least one; only without a wait).
-- Returns {admitted (0/1), wait (microseconds, rounded up), tokens left, time until full
-- (microseconds, rounded up), the TAT stored (a string), times the cost taken}.
local token = tonumber(ARGV[1])
local unit = tonumber(ARGV[2])
local capacity = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local max_wait = math.min(tonumber(ARGV[5]) * unit, 2 ^ 51)
local batch = tonumber(ARGV[6])
local tolerance = token * capacity

local stored = redis.call('GET', KEYS[1])
local debt = debt_of(stored, unit)
if debt > tolerance + max_wait then
  -- Further from full than a full bucket's time and the longest wait: a TAT stored under
  -- another quota (a reload to one that fills sooner), or a server clock stepped back.
  -- The bucket is empty with its queue full, and is stored so, so that the wait it
  -- answers is the truth.
  debt = tolerance + max_wait
  stored = store(KEYS[1], debt, unit)
end
local held = divmod(math.max(0, tolerance - debt), token)
local granted = 1
if batch > 1 and max_wait == 0 then
  -- Taking k times the cost admits without a wait iff k * cost tokens are in the bucket.
  granted = math.max(1, math.min(batch, (divmod(held, cost))))
end
local new_debt = debt + token * cost * granted
local wait = new_debt - tolerance
if wait > max_wait then
  return {0, micros_up(wait, unit), held, micros_up(debt, unit), stored or '', 0}
end
local value, until_full = store(KEYS[1], new_debt, unit)
local left = divmod(math.max(0, tolerance - new_debt), token)
return {1, micros_up(math.max(0, wait), unit), left, until_full, value, granted}
