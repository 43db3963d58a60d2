-- celery-breaker: what every script checks in what it reads from Redis (every script starts with this file).
--
-- Redis holds text, and Lua's tonumber reads 'nan', 'inf', '-inf' and '1e999' as numbers:
-- every number a script reads goes through one of these readers, which answer nil for
-- anything out of bounds, and the script resets what held it (the breaker, a window, a
-- lease, a parking key) with a warning naming the key and the value. Python mirrors the
-- bounds in storage/redis/bounds.py; docs/redis.md explains them.

-- Counters, generations, lease ids: whole numbers up to 2^53 (a double's exact integers).
local MAX_WHOLE = 9007199254740992
-- A stored time (epoch seconds on the script's clock) lies within this of now (~31,700 years):
-- finite, and no arithmetic on it overflows.
local TIME_SPAN = 1e12
-- How far past the latest moment it can legitimately name a stored time may lie (an open
-- period's end, a lease's deadline, a failure that happened): the script's clock may have
-- stepped back by this much (a failover to a server whose clock is behind) and nothing is
-- lost; anything later was never written by a script and would hold for ever.
local CLOCK_SLACK = 300
-- A value shown in a warning: at most this many characters of it.
local SHOWN = 60

local function finite(x)
  return type(x) == 'number' and x == x and x > -math.huge and x < math.huge
end

-- A finite number read from text (or a number); nil when there is none.
local function read_number(text)
  local x = tonumber(text)
  if finite(x) then return x end
  return nil
end

-- A whole number in [0, most] (most: MAX_WHOLE unless given); nil otherwise.
local function read_whole(text, most)
  local x = read_number(text)
  if x ~= nil and x >= 0 and x <= (most or MAX_WHOLE) and x == math.floor(x) then return x end
  return nil
end

-- A time within TIME_SPAN of now; given `reach` (seconds), also at most reach + CLOCK_SLACK
-- after now (0: a moment that has passed). nil otherwise.
local function read_time(text, now, reach)
  local t = read_number(text)
  if t == nil or t < now - TIME_SPAN then return nil end
  if reach == nil then
    if t > now + TIME_SPAN then return nil end
  elseif t > now + reach + CLOCK_SLACK then
    return nil
  end
  return t
end

-- The clock a script decides on: the caller's reading (the time=client test seam), else Redis TIME.
local function script_now(text)
  if text ~= nil and text ~= '' then return tonumber(text) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- A stored value as a warning shows it: quoted, cut short.
local function show(value)
  if value == nil or value == false then return '(none)' end
  local text = tostring(value)
  if #text > SHOWN then text = string.sub(text, 1, SHOWN) .. '...' end
  return "'" .. text .. "'"
end

local function fmt(x)
  if x == nil then return '' end
  return string.format('%.17g', x)
end

-- -- names in keys (store.py keys_for) ------------------------------------------

-- urllib.parse.quote(text, safe=''): how store.py writes a prefix, a name and a key into a key.
local function quote(text)
  return (string.gsub(text, '[^A-Za-z0-9_%.~%-]', function(c) return string.format('%%%02X', string.byte(c)) end))
end

local function unquote(text)
  return (string.gsub(text, '%%(%x%x)', function(hex) return string.char(tonumber(hex, 16)) end))
end

-- The breaker a hash tag '{prefix:name[:key]}' (with anything after it) belongs to: its
-- name and '-' (no key) or '+' .. key, as the state hash keeps them; nil when the tag is
-- not one store.py writes (it would not quote back to itself).
local function breaker_of(key)
  local tail = string.match(key, '^{[^:{}]*:([^{}]*)}')
  if tail == nil then return nil end
  local colon = string.find(tail, ':', 1, true)
  local name, ky
  if colon == nil then
    name, ky = unquote(tail), '-'
  else
    name, ky = unquote(string.sub(tail, 1, colon - 1)), '+' .. unquote(string.sub(tail, colon + 1))
  end
  local again = quote(name)
  if ky ~= '-' then again = again .. ':' .. quote(string.sub(ky, 2)) end
  if again ~= tail then return nil end
  return name, ky
end

-- -- the policy text's limits (what every reader of a breaker needs) -----------------

-- Parameters as the policy text gives them: finite numbers (cjson reads 'Infinity' too).
local function number(x)
  if finite(x) then return x end
  return nil
end
local function whole(x)
  x = number(x)
  if x ~= nil and x >= 1 and x <= MAX_WHOLE and x == math.floor(x) then return x end
  return nil
end
local function positive(x)
  x = number(x)
  if x ~= nil and x > 0 then return x end
  return nil
end
local function fraction(x) -- a rate: (0, 1]
  x = positive(x)
  if x ~= nil and x <= 1 then return x end
  return nil
end

-- The open and half-open parameters of a policy text (replies.py policy_text), checked as
-- BreakerPolicy checks them, and what the rules are read from: a decoded version 3 text,
-- or the fields of a positional one (versions 1 and 2, earlier releases):
-- '2;failure_threshold;window;failure_rate;minimum_calls;count_window;slow_call_duration;
-- slow_call_rate;reset_timeout;half_open_max_calls;success_threshold;half_open_max_wait;
-- calls_to_judge;probes_to_close;backoff_multiplier;max_reset_timeout;reset_jitter;longest_open'
-- (empty = None); version 1, the first 14 fields, has no backoff and no jitter.
-- nil when the text is unreadable.
local function policy_limits(text)
  if type(text) ~= 'string' then return nil end
  local p, source
  if string.sub(text, 1, 1) == '{' then
    local decoded, d = pcall(cjson.decode, text)
    if not decoded or type(d) ~= 'table' or d.v ~= 3 or type(d.rules) ~= 'table' then return nil end
    p = {
      reset_timeout = positive(d.reset_timeout), max_calls = whole(d.half_open_max_calls),
      max_wait = positive(d.half_open_max_wait), probes_to_close = whole(d.probes_to_close),
      multiplier = number(d.backoff_multiplier), jitter = number(d.reset_jitter),
      longest_open = positive(d.longest_open), slow_duration = positive(d.slow_call_duration),
    }
    if d.slow_call_duration ~= nil and p.slow_duration == nil then return nil end
    source = d
  else
    local f = {}
    for item in (text .. ';'):gmatch('([^;]*);') do f[#f + 1] = item end
    if not ((#f == 18 and f[1] == '2') or (#f == 14 and f[1] == '1')) then return nil end
    p = {
      reset_timeout = positive(tonumber(f[9])), max_calls = whole(tonumber(f[10])),
      max_wait = positive(tonumber(f[12])), probes_to_close = whole(tonumber(f[14])),
      multiplier = 1, jitter = 0, longest_open = positive(tonumber(f[9])),
      slow_duration = positive(tonumber(f[7])),
    }
    if f[7] ~= '' and p.slow_duration == nil then return nil end
    if f[1] == '2' then
      p.multiplier, p.jitter, p.longest_open = number(tonumber(f[15])), number(tonumber(f[17])),
        positive(tonumber(f[18]))
    end
    source = f
  end
  if not (p.reset_timeout and p.max_calls and p.max_wait and p.probes_to_close and p.multiplier
      and p.jitter and p.longest_open) then
    return nil
  end
  if p.multiplier < 1 or p.jitter < 0 or p.jitter >= 1 or p.longest_open < p.reset_timeout
      or p.probes_to_close > p.max_calls then
    return nil
  end
  return p, source
end
