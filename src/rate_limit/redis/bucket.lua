-- Shared by the scripts. Time is counted exactly in units: one token costs `token`
-- units and one microsecond is `unit` units (from the quota's rate in lowest terms). A
-- TAT is stored as whole microseconds of the server's clock, then, when it falls
-- between two, '.' and the units past the last one (below `unit`): '1700000000123456'
-- or '1700000000123456.2'. Only differences from now are computed in units, so every
-- number stays an integer below 2^53, exact in Lua's doubles.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

-- Floor division and remainder of non-negative integers below 2^53, exactly (a double
-- quotient may round across an integer).
local function divmod(a, b)
  local q = math.floor(a / b)
  local r = a - q * b
  if r < 0 then
    q = q - 1
    r = r + b
  elseif r >= b then
    q = q + 1
    r = r - b
  end
  return q, r
end

-- `units` (non-negative) in whole microseconds, rounded up.
local function micros_up(units, unit)
  local q, r = divmod(units, unit)
  if r > 0 then
    q = q + 1
  end
  return q
end

-- How far the stored TAT lies after now, in units (0 for a full bucket, a missing key,
-- or a value this script did not write).
local function debt_of(stored, unit)
  if not stored then
    return 0
  end
  local whole, past = string.match(stored, '^(%d+)%.?(%d*)$')
  if not whole then
    return 0
  end
  local debt = (tonumber(whole) - now) * unit + (tonumber(past) or 0)
  return math.max(0, debt)
end

-- Stores a TAT `debt` units after now (debt > 0), expiring when the bucket is full again
-- (an idle bucket vanishes, and a missing key reads as a full bucket); returns the value
-- stored and the microseconds until full.
local function store(key, debt, unit)
  local whole, past = divmod(debt, unit)
  local value = string.format('%.0f', now + whole)
  if past > 0 then
    value = value .. '.' .. string.format('%.0f', past)
  end
  local until_full = micros_up(debt, unit)
  redis.call('SET', key, value, 'PX', math.max(1, micros_up(until_full, 1000)))
  return value, until_full
end
