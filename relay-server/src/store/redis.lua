-- The relay's state on Redis: helpers shared by every script (each script
-- is this prelude followed by its own body; see redis.rs for the layout).
--
-- Keys, all under the prefix P:
--   live          sorted set: "ADDR KEY" -> expiry, in the Redis server's ms
--                 (the key in the member, so that a sample needs nothing more)
--   keyof         hash: peer address -> the key (hex) that owns its entry
--   p:ADDR        hash: digest (hex), count, files (the list, one
--                 "SIZE HASH NAME\n" line per holding, NAME as it is)
--   k:KEY         hash: addr (where the key is listed), ts (its newest
--                 accepted request time); expires retention after its last use
--   n:NAME        set of "SIZE HASH": the versions of a name
--   v:SIZE HASH NAME  set of addresses: the holders of a version
--   h:HASH        set of "SIZE NAME": the versions with that content
--   names         sorted set (all scores 0, so in byte order) of names
--   holdings      the number of holdings
--   stats         hash: the network's counters
local P = 'rp2p:'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- One line of a peer's list: SIZE HASH NAME.
local LINE = '(%d+) (%x+) ([^\n]+)'

-- Records that ADDR holds the version SIZE HASH NAME.
local function hold(addr, size, hash, name)
  redis.call('SADD', P .. 'v:' .. size .. ' ' .. hash .. ' ' .. name, addr)
  redis.call('SADD', P .. 'n:' .. name, size .. ' ' .. hash)
  redis.call('SADD', P .. 'h:' .. hash, size .. ' ' .. name)
  redis.call('ZADD', P .. 'names', 0, name)
end

-- Records that ADDR no longer holds it; the version, and the name, go with
-- their last holder.
local function unhold(addr, size, hash, name)
  local vk = P .. 'v:' .. size .. ' ' .. hash .. ' ' .. name
  redis.call('SREM', vk, addr)
  if redis.call('EXISTS', vk) == 0 then
    local nk = P .. 'n:' .. name
    redis.call('SREM', nk, size .. ' ' .. hash)
    redis.call('SREM', P .. 'h:' .. hash, size .. ' ' .. name)
    if redis.call('EXISTS', nk) == 0 then
      redis.call('ZREM', P .. 'names', name)
    end
  end
end

-- Forgets what ADDR holds; returns how many holdings that was.
local function unindex(addr)
  local pk = P .. 'p:' .. addr
  local blob = redis.call('HGET', pk, 'files')
  local n = 0
  if blob then
    for size, hash, name in string.gmatch(blob, LINE .. '\n') do
      unhold(addr, size, hash, name)
      n = n + 1
    end
    redis.call('DECRBY', P .. 'holdings', n)
  end
  redis.call('HDEL', pk, 'files', 'digest', 'count')
  return n
end

-- Forgets ADDR altogether: its entry, what it holds, its key's pointer to it.
local function drop(addr)
  unindex(addr)
  local key = redis.call('HGET', P .. 'keyof', addr)
  if key then
    redis.call('ZREM', P .. 'live', addr .. ' ' .. key)
    local kk = P .. 'k:' .. key
    if redis.call('HGET', kk, 'addr') == addr then
      redis.call('HDEL', kk, 'addr')
    end
  end
  redis.call('DEL', P .. 'p:' .. addr)
  redis.call('HDEL', P .. 'keyof', addr)
end

-- True when TS is not newer than the newest request accepted from KEY.
local function stale(key, ts)
  local last = redis.call('HGET', P .. 'k:' .. key, 'ts')
  return last ~= false and tonumber(ts) <= tonumber(last)
end

-- The holders of VERSIONS ("SIZE HASH NAME" each), most held first: at most
-- MAXV versions, a random PER of each, ROOM in all. Flat: SIZE HASH NAME
-- COUNT N, then N times ADDR KEY.
local function holders(versions, per, maxv, room)
  local counted = {}
  for _, v in ipairs(versions) do
    local c = redis.call('SCARD', P .. 'v:' .. v)
    if c > 0 then
      table.insert(counted, { v, c })
    end
  end
  table.sort(counted, function(a, b) return a[2] > b[2] end)
  local out = {}
  for i = 1, math.min(#counted, maxv) do
    local v, c = counted[i][1], counted[i][2]
    local size, hash, name = string.match(v, '^(%d+) (%x+) (.+)$')
    local pairs_ = {}
    if room > 0 and per > 0 then
      local picked = redis.call('SRANDMEMBER', P .. 'v:' .. v, math.min(per, room))
      if #picked > 0 then
        local keys = redis.call('HMGET', P .. 'keyof', unpack(picked))
        for j, addr in ipairs(picked) do
          if keys[j] then
            pairs_[#pairs_ + 1] = addr
            pairs_[#pairs_ + 1] = keys[j]
          end
        end
      end
    end
    room = room - #pairs_ / 2
    table.insert(out, size)
    table.insert(out, hash)
    table.insert(out, name)
    table.insert(out, tostring(c))
    table.insert(out, tostring(#pairs_ / 2))
    for _, x in ipairs(pairs_) do
      table.insert(out, x)
    end
  end
  return out
end
