//! The store on Redis, which several relays share: a peer registered
//! through one is found through any, and a relay that stops loses nothing.
//!
//! Every change is one Lua script (redis.lua's helpers followed by the
//! operation's body) that reads and changes several keys atomically, so
//! relays never see each other's half-done changes; a lookup is one script
//! or one pipeline (an LS page reads a thousand names at a time). Times
//! are the Redis server's (`TIME`), so relays need not agree on the clock
//! for expiry. The layout of the keys is at the top of redis.lua. One Redis
//! server, not a cluster: scripts name keys of their own making.
//!
//! When Redis does not answer, every operation fails at once with
//! [`Unavailable`] for a while (the relay answers `ERR busy retry-after`),
//! then one call tries it again, the wait doubling up to [`MAX_BACKOFF`];
//! the sweeper's own calls each second are such tries, so the relay
//! recovers by itself even when nobody asks it anything.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use globset::GlobMatcher;
use log::{debug, info, warn};
use protocol::{
    identity::PeerKey,
    index::{Holder, Holding, ListDigest, Listed, MAX_REPLY_LINES},
    ContentHash, FileName, PeerAddr,
};
use redis::{Connection, ConnectionLike, RedisError, Script};

use super::{
    Page, RedisTarget, Refusal, Refused, Registered, Store, Stored, Unavailable, MAX_VERSIONS,
    SCAN_BUDGET,
};

/// The longest wait between two tries while Redis is unavailable.
pub const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// The first wait after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Connections kept to Redis, as many as the lookups a loaded relay has
/// in flight (64 clients measured): fewer left requests queueing for a
/// connection, a futex wait and wake each (strace, perf).
const POOL_SIZE: u32 = 64;
/// Peers expired by one sweep script, so that one call stays short.
const SWEEP_BATCH: usize = 100;
/// Runs of the registry one PEERS sample is drawn from.
const SAMPLE_RUNS: usize = 2;
/// Names read by one listing script.
const LIST_BATCH: usize = 1000;
/// The prefix of every key, as in redis.lua.
const PREFIX: &str = "rp2p:";

/// This machine's clock, in ms since 1970.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why a `--store` URL was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid redis URL {url:?}: {reason}")]
pub struct RedisUrlError {
    url: String,
    reason: String,
}

/// Checks that `url` names a Redis server this build can reach.
pub(super) fn check_url(url: &str) -> Result<(), RedisUrlError> {
    let refuse = |reason: String| RedisUrlError {
        url: without_password(url),
        reason,
    };
    if !url.starts_with("redis://") && !url.starts_with("redis+unix://") {
        return Err(refuse("expected redis://HOST:PORT/DB".into()));
    }
    redis::Client::open(url)
        .map(drop)
        .map_err(|e| refuse(e.to_string()))
}

/// `url` with its password, if any, replaced by `***`, for logs and errors
/// (the user part's, and a `redis+unix` URL's `pass` parameter).
pub(super) fn without_password(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        // Not a URL: nothing to show of it that could hold a secret.
        return "an invalid URL".into();
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    if parsed.query_pairs().any(|(k, _)| k == "pass") {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "pass" {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// Opens connections for the pool, each with the store's timeouts (the
/// `redis` crate's own pool support connects without one).
struct Connector {
    client: redis::Client,
    timeout: Duration,
    /// Bumped at each failure: connections made before it are not used
    /// again (after Redis restarts, every idle one is dead).
    generation: Arc<AtomicU64>,
}

/// A connection, with the generation it was made in.
struct Conn {
    con: Connection,
    generation: u64,
}

impl r2d2::ManageConnection for Connector {
    type Connection = Conn;
    type Error = RedisError;

    fn connect(&self) -> Result<Conn, RedisError> {
        let generation = self.generation.load(Ordering::Relaxed);
        let con = self.client.get_connection_with_timeout(self.timeout)?;
        con.set_read_timeout(Some(self.timeout))?;
        con.set_write_timeout(Some(self.timeout))?;
        Ok(Conn { con, generation })
    }

    fn is_valid(&self, conn: &mut Conn) -> Result<(), RedisError> {
        redis::cmd("PING").query::<String>(&mut conn.con).map(drop)
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        !conn.con.is_open() || conn.generation < self.generation.load(Ordering::Relaxed)
    }
}

/// Failed attempts to connect are the store's to report (once, with the
/// backoff), not the pool's (once per attempt).
#[derive(Debug)]
struct QuietErrors;

impl r2d2::HandleError<RedisError> for QuietErrors {
    fn handle_error(&self, error: RedisError) {
        debug!("redis: cannot connect: {error}");
    }
}

/// Whether Redis answers, and when to try again if not.
#[derive(Default)]
struct Health {
    down: Option<Down>,
}

struct Down {
    since: Instant,
    retry_at: Instant,
    backoff: Duration,
    why: String,
}

/// The scripts, each compiled once (the `redis` crate loads a script into
/// a Redis that does not know it yet, after a restart too).
struct Scripts {
    register: Script,
    unregister: Script,
    sweep: Script,
    replace: Script,
    who: Script,
    who_has: Script,
    versions: Script,
    count: Script,
}

const PRELUDE: &str = include_str!("redis.lua");

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            // ARGV: addr key ts ttl_ms keep_ms capacity
            register: script(
                r#"
local addr, key, ts = ARGV[1], ARGV[2], ARGV[3]
local ttl, keep, capacity = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if stale(key, ts) then return 'replayed' end
local now = now_ms()
local kk = P .. 'k:' .. key
local owner = redis.call('HGET', P .. 'keyof', addr)
if owner == key then
  redis.call('ZADD', P .. 'live', now + ttl, addr .. ' ' .. key)
  redis.call('HSET', kk, 'addr', addr, 'ts', ts)
  redis.call('PEXPIRE', kk, keep)
  return 'refreshed'
end
if owner then
  local expires = tonumber(redis.call('ZSCORE', P .. 'live', addr .. ' ' .. owner) or '0')
  if expires >= now then return 'taken' end
  drop(addr)
end
local from = redis.call('HGET', kk, 'addr')
if from == addr then from = false end
if not owner and not from and redis.call('ZCARD', P .. 'live') >= capacity then
  return 'full'
end
if from and redis.call('HGET', P .. 'keyof', from) == key then drop(from) end
redis.call('HSET', P .. 'keyof', addr, key)
redis.call('ZADD', P .. 'live', now + ttl, addr .. ' ' .. key)
redis.call('HSET', kk, 'addr', addr, 'ts', ts)
redis.call('PEXPIRE', kk, keep)
if from then return 'moved ' .. from end
return 'new'
"#,
            ),
            // ARGV: addr key ts keep_ms
            unregister: script(
                r#"
local addr, key, ts = ARGV[1], ARGV[2], ARGV[3]
if stale(key, ts) then return 'replayed' end
local owner = redis.call('HGET', P .. 'keyof', addr)
if owner and owner ~= key then return 'taken' end
if owner then drop(addr) end
local kk = P .. 'k:' .. key
-- A key never seen gets no record: unsigned noise must not fill Redis.
if redis.call('EXISTS', kk) == 0 then return 'absent' end
redis.call('HSET', kk, 'ts', ts)
-- Kept at least the retention; longer while the key is listed elsewhere.
if redis.call('PTTL', kk) < tonumber(ARGV[4]) then
  redis.call('PEXPIRE', kk, tonumber(ARGV[4]))
end
if owner then return 'removed' end
return 'absent'
"#,
            ),
            // ARGV: limit
            sweep: script(
                r#"
local gone = redis.call('ZRANGEBYSCORE', P .. 'live', '-inf', '(' .. now_ms(),
  'LIMIT', 0, tonumber(ARGV[1]))
local addrs = {}
for i, member in ipairs(gone) do
  local addr = string.match(member, '^(%S+) ')
  drop(addr)
  -- The member itself too, should it ever disagree with keyof.
  redis.call('ZREM', P .. 'live', member)
  addrs[i] = addr
end
return addrs
"#,
            ),
            // ARGV: addr key digest max_holdings count files
            replace: script(
                r#"
local addr, key, digest = ARGV[1], ARGV[2], ARGV[3]
local max, n, blob = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local pk = P .. 'p:' .. addr
if redis.call('HGET', P .. 'keyof', addr) ~= key then return -1 end
local old_count = tonumber(redis.call('HGET', pk, 'count') or '0')
-- The same list again: nothing to do.
if redis.call('HGET', pk, 'digest') == digest and old_count == n then return n end
local held = tonumber(redis.call('GET', P .. 'holdings') or '0')
if held - old_count + n > max then return -2 end
-- Only what changed: the lines that left, the lines that came.
local old = {}
for line in string.gmatch(redis.call('HGET', pk, 'files') or '', '([^\n]+)\n') do
  old[line] = true
end
for line in string.gmatch(blob, '([^\n]+)\n') do
  if old[line] then
    old[line] = nil
  else
    local size, hash, name = string.match(line, '^' .. LINE .. '$')
    hold(addr, size, hash, name)
  end
end
for line in pairs(old) do
  local size, hash, name = string.match(line, '^' .. LINE .. '$')
  unhold(addr, size, hash, name)
end
redis.call('HSET', pk, 'files', blob, 'digest', digest, 'count', n)
redis.call('INCRBY', P .. 'holdings', n - old_count)
return n
"#,
            ),
            // ARGV: name per maxv room
            who: script(
                r#"
local name = ARGV[1]
local versions = {}
for _, v in ipairs(redis.call('SMEMBERS', P .. 'n:' .. name)) do
  table.insert(versions, v .. ' ' .. name)
end
return holders(versions, tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
"#,
            ),
            // ARGV: hash per maxv room
            who_has: script(
                r#"
local hash = ARGV[1]
local versions = {}
for _, v in ipairs(redis.call('SMEMBERS', P .. 'h:' .. hash)) do
  local size, name = string.match(v, '^(%d+) (.+)$')
  table.insert(versions, size .. ' ' .. hash .. ' ' .. name)
end
return holders(versions, tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
"#,
            ),
            // ARGV: relay seq keep_ms, then NAME COUNT pairs. Adds the
            // counts unless this relay's batch `seq` was added already.
            count: script(
                r#"
local mark = P .. 'counted:' .. ARGV[1]
if tonumber(ARGV[2]) <= tonumber(redis.call('GET', mark) or '0') then return 0 end
redis.call('SET', mark, ARGV[2], 'PX', tonumber(ARGV[3]))
for i = 4, #ARGV, 2 do
  redis.call('HINCRBY', P .. 'stats', ARGV[i], tonumber(ARGV[i + 1]))
end
return 1
"#,
            ),
            // ARGV: the names. Flat: NAME N, then N times SIZE HASH COUNT.
            versions: script(
                r#"
local out = {}
for _, name in ipairs(ARGV) do
  local versions = redis.call('SMEMBERS', P .. 'n:' .. name)
  out[#out + 1] = name
  out[#out + 1] = tostring(#versions)
  for _, v in ipairs(versions) do
    local size, hash = string.match(v, '^(%d+) (%x+)$')
    out[#out + 1] = size
    out[#out + 1] = hash
    out[#out + 1] = tostring(redis.call('SCARD', P .. 'v:' .. v .. ' ' .. name))
  end
end
return out
"#,
            ),
        }
    }
}

/// The relay's state on a Redis server.
pub struct RedisStore {
    pool: r2d2::Pool<Connector>,
    target: String,
    scripts: Scripts,
    health: Mutex<Health>,
    /// Where the live peers start in the expiry order, and how many there
    /// are, as of the last sample: where the next one's runs may start.
    ranks: Mutex<(usize, usize)>,
    /// Redis's clock minus ours, in ms, as of the last sample.
    clock_offset: AtomicI64,
    /// Whether a sample was drawn yet (and so the two above are known).
    primed: AtomicBool,
    /// This relay's name in the marks of its counts' batches.
    flush_id: u64,
    /// This relay's counts on their way to Redis.
    flush: Mutex<Flush>,
    /// Whether `health` holds a failure: read without its lock.
    down: AtomicBool,
    /// The connector's generation (see there).
    generation: Arc<AtomicU64>,
    ttl: Duration,
    retention: Duration,
    capacity: usize,
    max_holdings: usize,
}

impl RedisStore {
    /// A store on `target` with the relay's limits. Connects lazily: a
    /// relay starts while Redis is down, and answers once it is up.
    pub fn new(
        target: &RedisTarget,
        ttl: Duration,
        capacity: usize,
        max_holdings: usize,
        retention: Duration,
    ) -> Result<Self, super::RedisUrlError> {
        // `RedisTarget::parse` checked the URL already; this cannot fail
        // unless the crate changes its mind.
        let client = redis::Client::open(target.url()).map_err(|e| RedisUrlError {
            url: target.display(),
            reason: e.to_string(),
        })?;
        // From 1: a connection that failed is marked 0, older than any.
        let generation = Arc::new(AtomicU64::new(1));
        let pool = r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            // No connections held while idle, none opened at start.
            .min_idle(Some(0))
            .connection_timeout(target.timeout)
            // No PING before each use (a round trip per request): a broken
            // connection shows when it is used, and is then not reused.
            .test_on_check_out(false)
            .error_handler(Box::new(QuietErrors))
            .build_unchecked(Connector {
                client,
                timeout: target.timeout,
                generation: Arc::clone(&generation),
            });
        Ok(RedisStore {
            pool,
            target: target.display(),
            scripts: Scripts::new(),
            health: Mutex::default(),
            down: AtomicBool::new(false),
            ranks: Mutex::default(),
            clock_offset: AtomicI64::new(0),
            primed: AtomicBool::new(false),
            flush_id: fastrand::u64(..),
            flush: Mutex::default(),
            generation,
            ttl,
            retention,
            capacity,
            max_holdings,
        })
    }

    /// Runs `op` on a pooled connection, unless Redis failed lately and
    /// its next try is not due; keeps the health up to date.
    fn run<T>(&self, op: impl FnOnce(&mut Connection) -> redis::RedisResult<T>) -> Stored<T> {
        if let Some(why) = self.waiting() {
            return Err(Unavailable(why));
        }
        let result = match self.connection() {
            // A connection whose reply came too late skips it before the
            // next (the crate's doing); one that was closed, or failed, or
            // was made before the last failure is not reused (`has_broken`).
            Ok(mut conn) => op(&mut conn.con).map_err(|e| {
                let trouble = Trouble::of(&e);
                if trouble == Trouble::Connection {
                    conn.generation = 0;
                }
                (trouble, describe(&e))
            }),
            // The pool's error names the last failure to connect.
            Err(e) => Err((
                Trouble::Connection,
                format!(
                    "no connection within {:?}: {e}",
                    self.pool.connection_timeout()
                ),
            )),
        };
        match result {
            Ok(value) => {
                self.up();
                Ok(value)
            }
            Err((Trouble::Reply, why)) => {
                warn!("redis at {}: {why}", self.target);
                Err(Unavailable(why))
            }
            Err((trouble, why)) => Err(Unavailable(self.failed(why, trouble))),
        }
    }

    /// A pooled connection made since the last failure: older ones are
    /// given back, and dropped as broken, until one is.
    fn connection(&self) -> Result<r2d2::PooledConnection<Connector>, r2d2::Error> {
        for _ in 0..POOL_SIZE {
            let conn = self.pool.get()?;
            if conn.generation >= self.generation.load(Ordering::Relaxed) {
                return Ok(conn);
            }
        }
        self.pool.get()
    }

    /// While a failure's backoff runs: why the store is unavailable. When
    /// it is over, one caller tries Redis (and the others keep waiting:
    /// its try may take the whole timeout).
    fn waiting(&self) -> Option<String> {
        // The common case without the lock, which every request would take.
        if !self.down.load(Ordering::Relaxed) {
            return None;
        }
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let down = health.down.as_mut()?;
        let now = Instant::now();
        match down.retry_at.checked_duration_since(now) {
            Some(left) => Some(format!("{}; next try in {}ms", down.why, left.as_millis())),
            None => {
                down.retry_at = now + down.backoff + self.pool.connection_timeout();
                None
            }
        }
    }

    fn up(&self) {
        if !self.down.load(Ordering::Relaxed) {
            return;
        }
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        self.down.store(false, Ordering::Relaxed);
        if let Some(down) = health.down.take() {
            info!(
                "redis at {} answers again, after {:.1?}",
                self.target,
                down.since.elapsed()
            );
        }
    }

    /// Notes a failure; returns its description. After one of the
    /// connection, no connection made before it is used again.
    fn failed(&self, why: String, trouble: Trouble) -> String {
        if trouble == Trouble::Connection {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let backoff = match &health.down {
            Some(down) => (down.backoff * 2).min(MAX_BACKOFF),
            None => {
                warn!(
                    "redis at {} is unavailable ({why}): answering ERR busy, trying again with backoff",
                    self.target
                );
                FIRST_BACKOFF
            }
        };
        let since = health.down.as_ref().map_or(now, |d| d.since);
        self.down.store(true, Ordering::Relaxed);
        health.down = Some(Down {
            since,
            retry_at: now + backoff,
            backoff,
            why: why.clone(),
        });
        why
    }

    fn ms(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }
}

/// A live peer and its key, as PEERS LONG lists them.
type Listing = (PeerAddr, PeerKey);

/// How long Redis remembers the last batch of counts of a relay: past any
/// retry of that batch (retries come each second).
const FLUSH_MEMORY_MS: u64 = 3_600_000;

/// A relay's counts not yet known to be in Redis.
#[derive(Default)]
struct Flush {
    /// The number of the last batch sent.
    seq: u64,
    /// A batch sent whose reply did not come: it may be in Redis or not.
    attempted: Option<(u64, Vec<(&'static str, u64)>)>,
    /// Counts not sent yet.
    pending: std::collections::BTreeMap<&'static str, u64>,
}

/// What kind of failure an error is, for what to do next.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Trouble {
    /// No connection, a lost one, no reply in time: Redis is away. Wait,
    /// and use no connection of before again.
    Connection,
    /// Redis answered that it cannot now (loading its data, out of memory,
    /// busy with a script, a replica): wait, connections are fine.
    Server,
    /// A reply we did not expect (another program's keys?): this request
    /// fails, the others go on.
    Reply,
}

impl Trouble {
    fn of(e: &RedisError) -> Trouble {
        const UNAVAILABLE: [&str; 7] = [
            "LOADING",
            "BUSY",
            "OOM",
            "TRYAGAIN",
            "MASTERDOWN",
            "READONLY",
            "CLUSTERDOWN",
        ];
        if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error()
        {
            Trouble::Connection
        } else if e.code().is_some_and(|code| UNAVAILABLE.contains(&code)) {
            Trouble::Server
        } else {
            Trouble::Reply
        }
    }
}

/// A Redis error in a few words, without the crate's debug detail.
fn describe(e: &RedisError) -> String {
    if e.is_connection_refusal() {
        "connection refused".into()
    } else if e.is_timeout() {
        "timed out".into()
    } else if e.is_connection_dropped() {
        "connection lost".into()
    } else {
        e.to_string()
    }
}

/// Turns a script's flat reply of holders into `Holder`s; entries that do
/// not parse (a store written by something else) are skipped.
fn parse_holders(flat: &[String]) -> Vec<Holder> {
    let mut out = Vec::new();
    let mut rest = flat;
    while let [size, hash, name, count, n, tail @ ..] = rest {
        let n: usize = n.parse().unwrap_or(0).min(tail.len() / 2);
        let version = (
            size.parse::<u64>(),
            hash.parse::<ContentHash>(),
            FileName::new(name),
            count.parse::<u64>(),
        );
        if let (Ok(size), Ok(hash), Ok(name), Ok(holders)) = version {
            for pair in tail[..n * 2].chunks_exact(2) {
                if let (Ok(addr), Ok(key)) = (pair[0].parse(), pair[1].parse()) {
                    out.push(Holder {
                        addr,
                        key,
                        name: name.clone(),
                        size,
                        hash,
                        holders,
                    });
                }
            }
        }
        rest = &tail[n * 2..];
    }
    out
}

/// The next name's versions from the `versions` script's flat reply (it
/// answers the names in the order asked), most held first.
fn listed_versions(name: &str, flat: &mut impl Iterator<Item = String>) -> Vec<Listed> {
    let (Some(_), Some(n)) = (flat.next(), flat.next()) else {
        return Vec::new();
    };
    let n: usize = n.parse().unwrap_or(0);
    let triples: Vec<String> = flat.take(n * 3).collect();
    let Ok(file_name) = FileName::new(name) else {
        return Vec::new();
    };
    let mut listed: Vec<Listed> = triples
        .chunks_exact(3)
        .filter_map(|v| {
            Some(Listed {
                name: file_name.clone(),
                size: v[0].parse().ok()?,
                hash: v[1].parse().ok()?,
                holders: v[2].parse().ok()?,
            })
        })
        .filter(|l| l.holders > 0)
        .collect();
    listed.sort_by_key(|l| std::cmp::Reverse(l.holders));
    listed
}

/// Redis's clock minus ours, in ms: `time` is its `TIME` reply (seconds,
/// microseconds), read between our `sent` and `received` (ms since 1970).
fn clock_offset(time: (u64, u64), sent: u64, received: u64) -> i64 {
    let redis_ms = time.0 * 1000 + time.1 / 1000;
    let ours = sent.midpoint(received);
    i64::try_from(redis_ms).unwrap_or(0) - i64::try_from(ours).unwrap_or(0)
}

/// `files` as the `files` field of a peer's entry: one line per holding.
fn encode_files(files: &[Holding]) -> String {
    let mut blob = String::with_capacity(files.len() * 96);
    for f in files {
        // Names hold no control characters, so a newline ends each.
        blob.push_str(&format!("{} {} {}\n", f.size, f.hash, f.name.as_str()));
    }
    blob
}

impl Store for RedisStore {
    fn register(&self, peer: PeerAddr, key: PeerKey, ts: u64) -> Stored<Registered> {
        let keep = Self::ms(self.ttl + self.retention);
        let answer: String = self.run(|con| {
            self.scripts
                .register
                .arg(peer.to_string())
                .arg(key.to_string())
                .arg(ts)
                .arg(Self::ms(self.ttl))
                .arg(keep)
                .arg(self.capacity)
                .invoke(con)
        })?;
        Ok(match answer.as_str() {
            "new" => Registered::New,
            "refreshed" => Registered::Refreshed,
            "full" => Registered::Full,
            "taken" => Registered::Taken,
            "replayed" => Registered::Replayed,
            moved => match moved.strip_prefix("moved ").map(str::parse) {
                Some(Ok(from)) => Registered::Moved { from },
                _ => return Err(self.strange("REGISTER", moved)),
            },
        })
    }

    fn unregister(&self, peer: PeerAddr, key: PeerKey, ts: u64) -> Stored<Result<bool, Refusal>> {
        let answer: String = self.run(|con| {
            self.scripts
                .unregister
                .arg(peer.to_string())
                .arg(key.to_string())
                .arg(ts)
                .arg(Self::ms(self.retention))
                .invoke(con)
        })?;
        Ok(match answer.as_str() {
            "removed" => Ok(true),
            "absent" => Ok(false),
            "taken" => Err(Refusal::Taken),
            "replayed" => Err(Refusal::Replayed),
            other => return Err(self.strange("UNREGISTER", other)),
        })
    }

    fn expire(&self) -> Stored<Vec<PeerAddr>> {
        let mut expired = Vec::new();
        // Everything due, in short scripts, within half a second (the
        // rest next time): after an outage longer than the TTL, the dead
        // are gone from the answers within seconds.
        let started = Instant::now();
        for _ in 0..10_000 {
            if started.elapsed() > Duration::from_millis(500) {
                break;
            }
            let gone: Vec<String> =
                self.run(|con| self.scripts.sweep.arg(SWEEP_BATCH).invoke(con))?;
            let done = gone.len() < SWEEP_BATCH;
            expired.extend(gone.iter().filter_map(|a| a.parse::<PeerAddr>().ok()));
            if done {
                break;
            }
        }
        Ok(expired)
    }

    fn sample(&self, max: usize) -> Stored<Vec<(PeerAddr, PeerKey)>> {
        // The first sample learns the counts and Redis's clock first.
        if !self.primed.swap(true, Ordering::Relaxed) {
            self.draw(max)?;
        }
        let (peers, live, whole) = self.draw(max)?;
        // Drawn from counts that were old (many expired, or came, since):
        // once more with this one's.
        if peers.len() < max.min(live) || (whole && live > max * 2) {
            return Ok(self.draw(max)?.0);
        }
        Ok(peers)
    }

    fn peers(&self) -> Stored<usize> {
        self.run(|con| redis::cmd("ZCARD").arg(format!("{PREFIX}live")).query(con))
    }

    fn digest(&self, peer: PeerAddr) -> Stored<Option<ListDigest>> {
        let digest: Option<String> = self.run(|con| {
            redis::cmd("HGET")
                .arg(format!("{PREFIX}p:{peer}"))
                .arg("digest")
                .query(con)
        })?;
        Ok(digest.and_then(|d| d.parse().ok()))
    }

    fn replace(
        &self,
        peer: PeerAddr,
        key: PeerKey,
        digest: ListDigest,
        files: &[Holding],
    ) -> Stored<Result<usize, Refused>> {
        let blob = encode_files(files);
        let count: i64 = self.run(|con| {
            self.scripts
                .replace
                .arg(peer.to_string())
                .arg(key.to_string())
                .arg(digest.to_string())
                .arg(self.max_holdings)
                .arg(files.len())
                .arg(&blob)
                .invoke(con)
        })?;
        Ok(match count {
            -2 => Err(Refused::Full {
                max: self.max_holdings,
            }),
            -1 => Err(Refused::Gone),
            n => Ok(usize::try_from(n).unwrap_or(0)),
        })
    }

    fn who(&self, name: &FileName, per_version: usize) -> Stored<Vec<Holder>> {
        self.holders(&self.scripts.who, name.as_str(), per_version)
    }

    fn who_has(&self, hash: &ContentHash, per_version: usize) -> Stored<Vec<Holder>> {
        self.holders(&self.scripts.who_has, &hash.to_string(), per_version)
    }

    fn list(&self, pattern: &GlobMatcher, after: Option<&FileName>) -> Stored<Page> {
        let mut entries = Vec::new();
        let mut cursor = after.map(|a| a.as_str().to_string());
        let mut last: Option<String> = None;
        let mut scanned = 0;
        loop {
            // Names first, matched here: Redis reads the versions of the
            // matching names only (a pattern that matches little costs it
            // one range read per thousand names).
            let start = cursor.as_ref().map_or("-".to_string(), |c| format!("({c}"));
            let names: Vec<String> = self.run(|con| {
                redis::cmd("ZRANGEBYLEX")
                    .arg(format!("{PREFIX}names"))
                    .arg(&start)
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(LIST_BATCH)
                    .query(con)
            })?;
            let matches: Vec<bool> = names.iter().map(|n| pattern.is_match(n)).collect();
            let mut versions = if matches.contains(&true) {
                let mut call = self.scripts.versions.prepare_invoke();
                for (name, _) in names.iter().zip(&matches).filter(|(_, m)| **m) {
                    call.arg(name.as_str());
                }
                self.run(|con| call.invoke::<Vec<String>>(con))?
            } else {
                Vec::new()
            }
            .into_iter();
            for (name, &matched) in names.iter().zip(&matches) {
                let listed = if matched {
                    listed_versions(name, &mut versions)
                } else {
                    Vec::new()
                };
                if scanned == SCAN_BUDGET
                    || entries.len() + listed.len().min(MAX_VERSIONS) > MAX_REPLY_LINES
                {
                    return Ok(Page {
                        entries,
                        next: last.and_then(|n| FileName::new(&n).ok()),
                    });
                }
                scanned += 1;
                last = Some(name.clone());
                entries.extend(listed.into_iter().take(MAX_VERSIONS));
            }
            if names.len() < LIST_BATCH {
                return Ok(Page {
                    entries,
                    next: None,
                });
            }
            cursor = last.clone();
        }
    }

    fn counts(&self) -> Stored<(usize, usize)> {
        let (holdings, names): (Option<i64>, usize) = self.run(|con| {
            redis::pipe()
                .cmd("GET")
                .arg(format!("{PREFIX}holdings"))
                .cmd("ZCARD")
                .arg(format!("{PREFIX}names"))
                .query(con)
        })?;
        let holdings = usize::try_from(holdings.unwrap_or(0)).unwrap_or(0);
        Ok((holdings, names))
    }

    fn add_counters(&self, counts: &[(&'static str, u64)]) {
        let mut flush = self.flush.lock().unwrap_or_else(|p| p.into_inner());
        for &(name, n) in counts {
            *flush.pending.entry(name).or_default() += n;
        }
        flush.pending.retain(|_, n| *n > 0);
        // A batch whose fate is unknown goes again under its own number
        // (applied once at most), before any new one.
        if let Some((seq, batch)) = flush.attempted.take() {
            if self.send_counts(seq, &batch).is_err() {
                flush.attempted = Some((seq, batch));
                return;
            }
        }
        if flush.pending.is_empty() {
            return;
        }
        flush.seq += 1;
        let batch: Vec<(&'static str, u64)> =
            std::mem::take(&mut flush.pending).into_iter().collect();
        let seq = flush.seq;
        if self.send_counts(seq, &batch).is_err() {
            flush.attempted = Some((seq, batch));
        }
    }

    fn counters(&self) -> Vec<(String, u64)> {
        let flush = self.flush.lock().unwrap_or_else(|p| p.into_inner());
        let mut counters: Vec<(String, u64)> = self
            .run(|con| {
                redis::cmd("HGETALL")
                    .arg(format!("{PREFIX}stats"))
                    .query::<Vec<(String, u64)>>(con)
            })
            .unwrap_or_default();
        // What this relay has not sent yet (or may have: then it shows
        // twice until it is known).
        let unsent = flush.attempted.iter().flat_map(|(_, b)| b.iter().copied());
        counters.extend(
            unsent
                .chain(flush.pending.iter().map(|(k, v)| (*k, *v)))
                .map(|(k, v)| (k.to_string(), v)),
        );
        counters
    }

    fn ping(&self) -> Stored<()> {
        // Goes through `run`'s backoff too, so a Redis that stays down is
        // asked no more often than the requests would ask it.
        self.run(|con| {
            if con.is_open() {
                redis::cmd("PING").query::<String>(con).map(drop)
            } else {
                Err(std::io::Error::from(std::io::ErrorKind::NotConnected).into())
            }
        })
    }
}

impl RedisStore {
    /// A sample, how many peers are live, and whether the sample was drawn
    /// from the first of them only (the registry looked small).
    fn draw(&self, max: usize) -> Stored<(Vec<Listing>, usize, bool)> {
        // Runs of the live peers in expiry order (the expired, not yet
        // swept, come first), each from a random rank: every live peer is
        // as likely to be picked as any other, at a fraction of what single
        // random draws cost Redis (ZRANDMEMBER's fair draws took 4x the
        // whole lookup), and in one round trip without a script (a
        // script's time went mostly to converting members to Lua and back).
        // The ranks come from the last sample's counts; this one's counts,
        // read in the same pipeline, leave out what has expired since.
        let (expired_before, live_before) = *self.ranks.lock().unwrap_or_else(|p| p.into_inner());
        let (runs, width) = if live_before <= max * 2 {
            (0, max * 2)
        } else {
            (SAMPLE_RUNS, max.div_ceil(SAMPLE_RUNS) + 2)
        };
        // One run in each of `runs` equal stretches, from a random place:
        // they never overlap (a sample is never short for that), and every
        // peer is as likely to be in one as any other.
        let stretch = live_before / runs.max(1);
        let base = fastrand::usize(..live_before.max(1));
        let mut starts: Vec<usize> = (0..runs)
            .map(|i| {
                let at = base + i * stretch + fastrand::usize(..=stretch.saturating_sub(width));
                expired_before + at % live_before
            })
            .collect();
        // From the first live peer: the whole registry when it is small,
        // and where a run that reaches the end goes on, so that the last
        // peers are as likely to be picked as the others.
        starts.push(expired_before);
        let sent = unix_ms();
        let now = sent.saturating_add_signed(self.clock_offset.load(Ordering::Relaxed));
        let live = format!("{PREFIX}live");
        let mut pipe = redis::pipe();
        pipe.cmd("TIME")
            .cmd("ZCOUNT")
            .arg(&live)
            .arg("-inf")
            .arg(format!("({now}"))
            .cmd("ZCARD")
            .arg(&live);
        for &start in &starts {
            pipe.cmd("ZRANGE")
                .arg(&live)
                .arg(start)
                .arg(start + width - 1);
        }
        let (time, expired, total, drawn): ((u64, u64), usize, usize, Vec<Vec<String>>) = self
            .run(|con| {
                let mut replies: Vec<redis::Value> = pipe.query(con)?;
                let drawn = replies.split_off(3.min(replies.len()));
                let [time, expired, total]: [redis::Value; 3] =
                    replies.try_into().map_err(|_| {
                        RedisError::from((redis::ErrorKind::UnexpectedReturnType, "short reply"))
                    })?;
                Ok((
                    redis::from_redis_value(time)?,
                    redis::from_redis_value(expired)?,
                    redis::from_redis_value(total)?,
                    drawn
                        .into_iter()
                        .map(redis::from_redis_value)
                        .collect::<Result<_, _>>()?,
                ))
            })?;
        // Redis's clock against ours, for the next sample's `now`.
        self.clock_offset
            .store(clock_offset(time, sent, unix_ms()), Ordering::Relaxed);
        *self.ranks.lock().unwrap_or_else(|p| p.into_inner()) =
            (expired, total.saturating_sub(expired));
        let none = Vec::new();
        let (first, drawn) = drawn.split_last().unwrap_or((&none, &[]));
        let from_first = |count: usize| {
            first
                .iter()
                .take(count)
                .enumerate()
                .map(move |(i, m)| (expired_before + i, m))
        };
        let mut members: Vec<(usize, &String)> = Vec::new();
        if runs == 0 {
            members.extend(from_first(width));
        }
        for (&start, run) in starts.iter().zip(drawn) {
            members.extend(run.iter().enumerate().map(|(i, m)| (start + i, m)));
            members.extend(from_first(width.saturating_sub(run.len())));
        }
        let mut peers: Vec<(PeerAddr, PeerKey)> = members
            .into_iter()
            // Expired before this sample's count: left out.
            .filter(|&(rank, _)| rank >= expired)
            .filter_map(|(_, member)| {
                let (addr, key) = member.split_once(' ')?;
                Some((addr.parse().ok()?, key.parse().ok()?))
            })
            .collect();
        // Runs may overlap.
        peers.sort_unstable_by_key(|(addr, _)| *addr);
        peers.dedup_by_key(|(addr, _)| *addr);
        fastrand::shuffle(&mut peers);
        peers.truncate(max);
        Ok((peers, total.saturating_sub(expired), runs == 0))
    }

    /// Adds batch number `seq` of this relay's counts, unless Redis has it.
    fn send_counts(&self, seq: u64, batch: &[(&'static str, u64)]) -> Stored<()> {
        let id = self.flush_id;
        self.run(|con| {
            let mut call = self.scripts.count.prepare_invoke();
            call.arg(format!("{id:016x}")).arg(seq).arg(FLUSH_MEMORY_MS);
            for (name, n) in batch {
                call.arg(*name).arg(*n);
            }
            call.invoke::<i64>(con).map(drop)
        })
    }

    /// WHO or WHOHAS: `script` run for the name or hash `what`.
    fn holders(&self, script: &Script, what: &str, per_version: usize) -> Stored<Vec<Holder>> {
        let flat: Vec<String> = self.run(|con| {
            script
                .arg(what)
                .arg(per_version)
                .arg(MAX_VERSIONS)
                .arg(MAX_REPLY_LINES)
                .invoke(con)
        })?;
        Ok(parse_holders(&flat))
    }

    /// A reply no script of ours gives: Redis holds keys of another
    /// program, or another version's.
    fn strange(&self, what: &str, reply: &str) -> Unavailable {
        warn!(
            "redis at {}: unexpected reply to {what}: {reply:?}",
            self.target
        );
        Unavailable(format!("redis at {}: unexpected reply", self.target))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::RedisServer;
    use r2d2::ManageConnection;

    /// A store whose Redis is never asked: for what it does with failures.
    fn unasked() -> RedisStore {
        let target = RedisTarget::parse("redis://127.0.0.1:1/0").unwrap();
        RedisStore::new(&target, Duration::from_secs(60), 10, 10, Duration::ZERO).unwrap()
    }

    fn backoff(store: &RedisStore) -> Option<Duration> {
        let health = store.health.lock().unwrap();
        health.down.as_ref().map(|d| d.backoff)
    }

    #[test]
    fn the_backoff_doubles_to_its_cap_and_starts_over_once_redis_answers() {
        let store = unasked();
        let mut seen = Vec::new();
        for _ in 0..7 {
            store.failed("refused".into(), Trouble::Connection);
            seen.push(backoff(&store).unwrap().as_millis());
        }
        assert_eq!(seen, [250, 500, 1000, 2000, 4000, 4000, 4000]);
        assert!(store.waiting().unwrap().contains("refused; next try in"));
        store.up();
        assert_eq!(backoff(&store), None);
        assert_eq!(store.waiting(), None);
        // A new failure is a new outage: from the first wait again.
        store.failed("refused".into(), Trouble::Connection);
        assert_eq!(backoff(&store), Some(FIRST_BACKOFF));
    }

    #[test]
    fn connections_made_before_a_failure_are_not_used_again() {
        let Some(redis) =
            RedisServer::start("connections_made_before_a_failure_are_not_used_again")
        else {
            return;
        };
        let connector = Connector {
            client: redis::Client::open(redis.url()).unwrap(),
            timeout: Duration::from_secs(5),
            generation: Arc::new(AtomicU64::new(0)),
        };
        let mut old = connector.connect().unwrap();
        assert!(!connector.has_broken(&mut old), "a good connection dropped");
        connector.generation.fetch_add(1, Ordering::Relaxed);
        let mut new = connector.connect().unwrap();
        assert!(connector.has_broken(&mut old));
        assert!(!connector.has_broken(&mut new), "a good connection dropped");
    }

    #[test]
    fn redis_errors_are_told_in_a_few_words() {
        use std::io::{Error, ErrorKind};
        let io = |kind: ErrorKind| describe(&RedisError::from(Error::from(kind)));
        assert_eq!(io(ErrorKind::ConnectionRefused), "connection refused");
        assert_eq!(io(ErrorKind::TimedOut), "timed out");
        assert_eq!(io(ErrorKind::BrokenPipe), "connection lost");
        let other = RedisError::from((redis::ErrorKind::Client, "loading"));
        assert!(describe(&other).contains("loading"), "{}", describe(&other));
    }

    #[test]
    fn redis_time_is_compared_with_ours_halfway_through_the_round_trip() {
        // Redis 2.5 s ahead, the reply 2 ms in coming.
        assert_eq!(
            clock_offset((1_000_002, 501_999), 1_000_000_000, 1_000_000_002),
            2_500
        );
        // Redis behind.
        assert_eq!(
            clock_offset((999_999, 0), 1_000_000_000, 1_000_000_000),
            -1_000
        );
    }

    #[test]
    fn a_sample_from_old_counts_leaves_out_what_expired_since() {
        let Some(redis) =
            RedisServer::start("a_sample_from_old_counts_leaves_out_what_expired_since")
        else {
            return;
        };
        let target = |ttl| {
            let mut target = RedisTarget::parse(&redis.url()).unwrap();
            target.timeout = Duration::from_secs(2);
            RedisStore::new(&target, ttl, 100, 10, Duration::from_secs(60)).unwrap()
        };
        let (short, long) = (
            target(Duration::from_millis(200)),
            target(Duration::from_secs(60)),
        );
        let peer = |n: u16| {
            let addr: PeerAddr = format!("127.0.0.1:{n}").parse().unwrap();
            let seed = [u8::try_from(n).unwrap(); 32];
            (addr, protocol::identity::Identity::from_seed(seed).key())
        };
        for n in 1..=30 {
            let (addr, key) = peer(n);
            short.register(addr, key, 1).unwrap();
        }
        // Until all 30 have expired (unswept).
        let deadline = Instant::now() + Duration::from_secs(20);
        while !long.sample(5).unwrap().is_empty() {
            assert!(Instant::now() < deadline, "never expired");
            std::thread::sleep(Duration::from_millis(20));
        }
        for n in 31..=40 {
            let (addr, key) = peer(n);
            long.register(addr, key, 1).unwrap();
        }
        for _ in 0..50 {
            // As the last sample left them: the 30 live, none expired.
            *short.ranks.lock().unwrap() = (0, 30);
            let sample = short.sample(5).unwrap();
            assert_eq!(sample.len(), 5);
            assert!(
                sample.iter().all(|(a, _)| a.port() > 30),
                "an expired peer was sampled: {sample:?}"
            );
        }
    }

    #[test]
    fn a_short_or_garbled_holders_reply_is_read_as_far_as_it_goes() {
        let (a, b): (PeerAddr, PeerAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let key = protocol::identity::Identity::from_seed([1; 32])
            .key()
            .to_string();
        let hash = blake3::hash(b"x").to_string();
        let flat = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (a_s, b_s) = (a.to_string(), b.to_string());
        // Says two holders, has one: that one.
        let short = parse_holders(&flat(&["1", &hash, "f", "2", "2", &a_s, &key]));
        assert_eq!(short.len(), 1);
        assert_eq!(short[0].addr, a);
        // A version that does not parse is skipped, not the next one.
        let garbled = parse_holders(&flat(&[
            "1", "nothex", "f", "1", "1", &a_s, &key, "1", &hash, "f", "1", "1", &b_s, &key,
        ]));
        assert_eq!(garbled.len(), 1);
        assert_eq!(garbled[0].addr, b);
    }
}
