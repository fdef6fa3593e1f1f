-- Hands back a reservation's tokens if nobody took tokens from the bucket since (after
-- bucket.lua).
-- KEYS[1]: the bucket. ARGV: the TAT the reservation left (as stored), its increment
-- (units), the units of a microsecond.
local stored = redis.call('GET', KEYS[1])
if stored ~= ARGV[1] then
  return 0
end
local unit = tonumber(ARGV[3])
local debt = debt_of(stored, unit) - tonumber(ARGV[2])
if debt <= 0 then
  redis.call('DEL', KEYS[1])
else
  store(KEYS[1], debt, unit)
end
return 1
