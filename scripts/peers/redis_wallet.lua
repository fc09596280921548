#!lua name=wallet
-- Redis 7 FUNCTION library: atomic, idempotent wallet tip (gift-storm baseline).
-- Adapted from the shared peers kit: the shape (users, streamers, hot share, tip size) is
-- substituted at load time (__HOT__, __NS__, __TIPMAX__), see scripts/bench-peers.sh.
--
--   u:<12-digit id>   STRING  user balance in coins
--   s:<12-digit id>   STRING  streamer earnings in coins (start at 0)
--   t:<tip id>        STRING  idempotency record (SET NX), kept forever: "1" applied, "0" rejected, "X" bad account
--   hist              STREAM  global history, one XADD per applied tip
--
-- Real API:  FCALL tip 4 <user_key> <streamer_key> <tip_key> <hist_key> <coins>
-- Benchmark: FCALL tip_bench 3 u:__rand_int__ t:__rand_int____rand_int__ hist __rand_int__ __rand_int__
--   with redis-benchmark -r USERS: r1, r2 uniform in [0, USERS).
--   r1 % 100 < HOT -> streamer 0, else streamer 1 + (r1 // 100) % (NS - 1); coins = 1 + r2 % TIPMAX.
-- Return: {code, user_balance_after}: 1 applied, 0 insufficient funds (recorded), -1 duplicate
-- of an applied tip, -2 duplicate of a rejected tip, -3 unknown account.

local HOT, NS, TIPMAX = __HOT__, __NS__, __TIPMAX__

local function do_tip(user_key, streamer_key, tip_key, hist_key, amount)
  local prev = redis.call('SET', tip_key, '1', 'NX', 'GET')
  if prev then
    if prev == '1' then return {-1, 0} elseif prev == '0' then return {-2, 0} else return {-3, 0} end
  end
  local bal = redis.call('GET', user_key)
  if not bal or redis.call('EXISTS', streamer_key) == 0 then
    redis.call('SET', tip_key, 'X')
    return {-3, 0}
  end
  bal = tonumber(bal)
  if bal < amount then
    redis.call('SET', tip_key, '0')
    return {0, bal}
  end
  local after = redis.call('DECRBY', user_key, amount)
  redis.call('INCRBY', streamer_key, amount)
  redis.call('XADD', hist_key, '*', 't', tip_key, 'f', user_key, 'to', streamer_key, 'a', amount)
  return {1, after}
end

local function tip(keys, args)
  local amount = tonumber(args[1])
  if not amount or amount <= 0 then return redis.error_reply('ERR bad amount') end
  return do_tip(keys[1], keys[2], keys[3], keys[4], amount)
end

local function tip_bench(keys, args)
  local r1, r2 = tonumber(args[1]), tonumber(args[2])
  local s = 0
  if r1 % 100 >= HOT and NS > 1 then s = 1 + (math.floor(r1 / 100) % (NS - 1)) end
  return do_tip(keys[1], string.format('s:%012d', s), keys[2], keys[3], 1 + (r2 % TIPMAX))
end

-- FCALL init 0 <nusers> <nstreamers> <user_balance>
local function init(keys, args)
  local nusers, nstreamers, bal = tonumber(args[1]), tonumber(args[2]), args[3]
  for i = 0, nusers - 1 do redis.call('SET', string.format('u:%012d', i), bal) end
  for i = 0, nstreamers - 1 do redis.call('SET', string.format('s:%012d', i), '0') end
  return nusers + nstreamers
end

-- FCALL_RO total 0 <nusers> <nstreamers> -> {sum users, sum streamers, hot streamer}
local function total(keys, args)
  local nusers, nstreamers = tonumber(args[1]), tonumber(args[2])
  local su, ss, hot = 0, 0, 0
  for i = 0, nusers - 1 do su = su + tonumber(redis.call('GET', string.format('u:%012d', i))) end
  for i = 0, nstreamers - 1 do
    local b = tonumber(redis.call('GET', string.format('s:%012d', i)))
    ss = ss + b
    if i == 0 then hot = b end
  end
  return {tostring(su), tostring(ss), tostring(hot)}
end

redis.register_function('tip', tip)
redis.register_function('init', init)
redis.register_function('tip_bench', tip_bench)
redis.register_function{function_name = 'total', callback = total, flags = {'no-writes'}}
