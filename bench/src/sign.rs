//! Simulated peers sign what they tell the relay, as real peers do: the
//! relay refuses unsigned REGISTER, UNREGISTER, ANNOUNCE and OFFER, keys
//! its entries by key (so each simulated peer needs its own), and wants
//! each key's times to increase and to be within 5 minutes of its clock.
//! Also the cost of signing and verifying, on one core.

use std::{
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use protocol::{
    identity::{Auth, Identity},
    relay::Request,
};

use crate::{procs, report::Row};

/// Milliseconds since the Unix epoch, the relay's idea of a request's time.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The identity of simulated peer `n`: its seed is BLAKE3 of the number,
/// so a peer signs with the same key in every figure that uses it.
pub fn identity(n: u64) -> Identity {
    Identity::from_seed(*blake3::hash(&n.to_le_bytes()).as_bytes())
}

/// One simulated peer's key, and the time of its last request.
pub struct Peer {
    identity: Identity,
    last_ts: u64,
}

impl Peer {
    pub fn new(n: u64) -> Peer {
        Peer {
            identity: identity(n),
            last_ts: 0,
        }
    }

    /// `request` signed now, as a line to send: its time is the clock's,
    /// or a millisecond after this key's last, whichever is later (two
    /// requests in one millisecond would otherwise look like a replay).
    pub fn sign(&mut self, request: &Request) -> Vec<u8> {
        let ts = unix_ms().max(self.last_ts + 1);
        self.sign_at(request, ts)
    }

    /// `request` signed with the time `ts`, which must be later than this
    /// key's last.
    pub fn sign_at(&mut self, request: &Request, ts: u64) -> Vec<u8> {
        assert!(ts > self.last_ts, "a key's times must increase");
        self.last_ts = ts;
        let auth = self.identity.authorize(&request.canonical(), ts);
        signed_line(request, &auth)
    }
}

fn signed_line(request: &Request, auth: &Auth) -> Vec<u8> {
    let mut line = Vec::with_capacity(300);
    // Writing to a Vec cannot fail.
    let _ = request.write_signed_to(auth, &mut line);
    line
}

/// The lines of `peers` simulated peers, `rounds` each, signed now on two
/// threads: round `r` of peer `i` is `request(i)` at the time of signing
/// plus `r` × `interval`, when it is due. Loads that time the relay send
/// these, so that the harness's own signing does not take CPU from the
/// relay while it is measured; they are sent within seconds of signing.
pub fn presign(
    peers: usize,
    rounds: u32,
    interval: Duration,
    request: impl Fn(usize) -> Request + Sync,
) -> Vec<Vec<Vec<u8>>> {
    let t0 = Instant::now();
    let base = unix_ms();
    let step = interval.as_millis() as u64;
    let sign_range = |range: std::ops::Range<usize>| -> Vec<Vec<Vec<u8>>> {
        range
            .map(|i| {
                let mut peer = Peer::new(i as u64);
                let request = request(i);
                (0..u64::from(rounds))
                    .map(|r| peer.sign_at(&request, base + r * step))
                    .collect()
            })
            .collect()
    };
    let half = peers / 2;
    let lines = thread::scope(|scope| {
        let first = scope.spawn(|| sign_range(0..half));
        let mut second = sign_range(half..peers);
        let mut lines = first.join().expect("a signing thread panicked");
        lines.append(&mut second);
        lines
    });
    eprintln!(
        "signed {} requests of {peers} peers in {:.1} s",
        peers * rounds as usize,
        t0.elapsed().as_secs_f64()
    );
    lines
}

/// Per-operation cost of Ed25519 on one core, as the relay and a peer pay
/// it: verifying a real request's signature (what the relay does for every
/// REGISTER, ANNOUNCE, OFFER and UNREGISTER), signing one, and making an
/// identity from its seed (what the harness pays once per simulated peer).
pub struct Costs {
    pub verify: Duration,
    pub sign: Duration,
    pub derive: Duration,
}

/// Each operation repeated for `span` (at least 100 times) on one thread.
pub fn costs(span: Duration) -> Costs {
    let me = identity(0);
    let request = Request::Register {
        port: 7000,
        host: None,
    };
    let line = request.canonical();
    let auth = me.authorize(&line, unix_ms());
    let verify = per_op(span, |_| assert!(auth.verifies(&line)));
    let sign = per_op(span, |n| {
        std::hint::black_box(me.authorize(&line, n));
    });
    let derive = per_op(span, |n| {
        std::hint::black_box(identity(n).key());
    });
    Costs {
        verify,
        sign,
        derive,
    }
}

/// Mean CPU time of `op` over a run of about `span`; `op` gets the
/// iteration. CPU time, not wall time: on a shared machine this thread is
/// descheduled now and then, which is not the operation's cost.
fn per_op(span: Duration, mut op: impl FnMut(u64)) -> Duration {
    let (t0, cpu0) = (Instant::now(), procs::thread_cpu_secs());
    let mut n = 0;
    while n < 100 || (t0.elapsed() < span && n < 10_000_000) {
        op(n);
        n += 1;
    }
    let wall = t0.elapsed().as_secs_f64();
    // /proc counts in 10 ms ticks: close enough over a run of a second.
    let cpu = match (cpu0, procs::thread_cpu_secs()) {
        (Some(a), Some(b)) if b > a => b - a,
        _ => wall,
    };
    Duration::from_secs_f64(cpu / n as f64)
}

pub fn rows(costs: &Costs) -> Vec<Row> {
    let rate = |d: Duration| format!("{:.0}/s ({:.1} µs)", 1.0 / d.as_secs_f64(), us(d));
    vec![
        Row::new(
            "Ed25519, CPU time on one core: verify a request's signature (the relay, per signed request)",
            rate(costs.verify),
        ),
        Row::new("  sign a request (a peer, per request)", rate(costs.sign)),
        Row::new(
            "  key from seed (the harness, per simulated peer)",
            rate(costs.derive),
        ),
    ]
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_lines_verify_and_times_increase() {
        let request = Request::Register {
            port: 7000,
            host: None,
        };
        let mut peer = Peer::new(3);
        let (a, b) = (peer.sign(&request), peer.sign(&request));
        let parse = |line: &[u8]| {
            let line = String::from_utf8(line.to_vec()).unwrap();
            Request::parse_signed(line.trim_end()).unwrap()
        };
        use protocol::relay::Credential::Signed;
        let ((ra, Some(Signed(aa))), (_, Some(Signed(ab)))) = (parse(&a), parse(&b)) else {
            panic!("unsigned")
        };
        assert_eq!(ra, request);
        assert!(aa.verifies(&request.canonical()) && ab.verifies(&request.canonical()));
        assert!(ab.ts > aa.ts);
        assert_eq!(aa.key, identity(3).key());
        assert_ne!(aa.key, identity(4).key());
    }

    #[test]
    fn presigned_rounds_are_due_one_interval_apart() {
        let lines = presign(3, 2, Duration::from_secs(1), |i| Request::Register {
            port: 7000 + i as u16,
            host: None,
        });
        assert_eq!(lines.len(), 3);
        let ts = |line: &[u8]| {
            let line = String::from_utf8(line.to_vec()).unwrap();
            match Request::parse_signed(line.trim_end()).unwrap().1 {
                Some(protocol::relay::Credential::Signed(auth)) => auth,
                other => panic!("not signed: {other:?}"),
            }
        };
        for (i, rounds) in lines.iter().enumerate() {
            let (a, b) = (ts(&rounds[0]), ts(&rounds[1]));
            assert_eq!(b.ts - a.ts, 1000);
            assert_eq!(a.key, identity(i as u64).key());
            let request = Request::Register {
                port: 7000 + i as u16,
                host: None,
            };
            assert!(a.verifies(&request.canonical()));
        }
    }
}
