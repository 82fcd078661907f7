//! The server-side (Lua) scripts. Each runs atomically in Redis; the client sends EVALSHA and reloads the script
//! on NOSCRIPT (`redis::Script`). Times inside the throttle script come from the server's clock (`TIME`), so
//! replicas with skewed clocks still share one GCRA timeline.

/// The longest a claim may reach the store after its token was due and still keep the throttle's schedule (µs):
/// see [`TAKE`]. Also at most half the emission interval.
pub const MAX_CARRY_US: u64 = 5_000;

/// The carry of a throttle with emission interval `interval_us`: `min(interval / 2, MAX_CARRY_US)`.
pub fn carry_us(interval_us: u64) -> u64 {
    (interval_us / 2).min(MAX_CARRY_US)
}

/// Takes up to `t_n` throttle tokens (GCRA) and then, unless the throttle refused, up to `q_n` quota units.
///
/// KEYS: throttle key, quota key. ARGV: t_n, emission interval (µs), burst, q_n, quota limit, quota key
/// expiry (Unix seconds). Returns `{tokens granted, µs until the next token (when none), quota units granted,
/// quota used after the take}`.
///
/// **Carry.** Plain GCRA restarts the schedule at `now` when a claim comes after its token was due, so the time
/// between the token being due and the claim reaching the store is capacity lost. With a burst of 1 nothing is
/// banked to hide that: replicas that ask again when the store's wait ends lose about one store round trip per
/// emission interval (−8.9 % at 100 req/s, burst 1, 3 replicas, before this). The script therefore lets the
/// theoretical arrival time lag `now` by up to [`carry_us`] (half an interval, at most [`MAX_CARRY_US`]): a claim
/// that late still gets the token at its due time and the schedule keeps its phase. The price is bounded: the
/// throttle behaves as GCRA with tolerance `(burst − 1) × T + carry` (carry < T), so any window of length D admits
/// at most `burst + ⌊(D + carry) / T⌋` — at most one token more than exact GCRA, never more than `burst` at one
/// instant.
pub const TAKE: &str = r#"
local t_n = tonumber(ARGV[1])
local T = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local q_n = tonumber(ARGV[4])
local q_limit = tonumber(ARGV[5])
local q_exp = tonumber(ARGV[6])
local t_got, wait = 0, 0
if t_n > 0 then
  local tm = redis.call('TIME')
  local now = tonumber(tm[1]) * 1000000 + tonumber(tm[2])
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  local carry = math.min(math.floor(T / 2), 5000)
  if tat < now - carry then tat = now - carry end
  local avail = math.floor((now + burst * T - tat) / T)
  if avail > t_n then avail = t_n end
  if avail > 0 then
    tat = tat + avail * T
    t_got = avail
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now + carry) / 1000) + 1)
  else
    wait = tat + T - burst * T - now
    if wait < 1 then wait = 1 end
  end
end
local q_got, used = 0, 0
if q_n > 0 and (t_n == 0 or t_got > 0) then
  used = tonumber(redis.call('GET', KEYS[2]) or '0')
  local g = q_limit - used
  if g > q_n then g = q_n end
  if g > 0 then
    used = redis.call('INCRBY', KEYS[2], g)
    redis.call('EXPIREAT', KEYS[2], q_exp)
    q_got = g
  end
end
return {t_got, wait, q_got, used}
"#;

/// Gives back unused leases: `t_n` throttle tokens (moves the GCRA arrival time back, never before now) and `q_n`
/// quota units (never below zero; nothing when the key is gone).
///
/// KEYS: throttle key, quota key. ARGV: t_n, emission interval (µs), q_n.
pub const GIVE_BACK: &str = r#"
local t_n = tonumber(ARGV[1])
local T = tonumber(ARGV[2])
local q_n = tonumber(ARGV[3])
if t_n > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  local tm = redis.call('TIME')
  local now = tonumber(tm[1]) * 1000000 + tonumber(tm[2])
  if tat > now then
    tat = tat - t_n * T
    if tat < now then tat = now end
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  end
end
if q_n > 0 then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used > 0 then
    local back = q_n
    if back > used then back = used end
    redis.call('DECRBY', KEYS[2], back)
  end
end
return 0
"#;

/// Records `id` as alive now, forgets members silent for `ttl` ms, and counts the rest.
///
/// KEYS: replicas key. ARGV: id, ttl (ms). Returns the number of live replicas (including `id`).
pub const HEARTBEAT: &str = r#"
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return redis.call('ZCARD', KEYS[1])
"#;
