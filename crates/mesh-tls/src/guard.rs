//! What a server's connection watches in the HTTP/2 frames going by (their 9-byte headers
//! only; payloads are skipped): the client's PINGs, counted over time and forgiven when the
//! server sends it headers or data, as grpc-go's keepalive enforcement does.

use std::time::{Duration, Instant};

/// The client's connection preface, before its first frame.
pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;
const END_STREAM: u8 = 0x1;

/// ENHANCE_YOUR_CALM, and the words grpc-go clients look for to back off their keepalive.
const ENHANCE_YOUR_CALM: u32 = 0xb;
const TOO_MANY_PINGS: &[u8] = b"too_many_pings";
const NO_ERROR: u32 = 0x0;
const IDLE: &[u8] = b"idle";

/// A frame's header: its type, flags, stream and payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHead {
    pub(crate) kind: u8,
    pub(crate) flags: u8,
    pub(crate) stream: u32,
}

/// Follows the frames of one direction of a connection, wherever reads or writes cut them.
#[derive(Debug)]
pub(crate) struct Frames {
    /// Bytes of the client preface still to come (none on the server's side).
    preface_left: usize,
    header: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    skip: usize,
}

impl Frames {
    /// What a client sends: the preface, then frames.
    pub(crate) fn from_client() -> Self {
        Frames { preface_left: H2_PREFACE.len(), header: [0; 9], have: 0, skip: 0 }
    }

    /// What a server sends: frames from the first byte.
    pub(crate) fn from_server() -> Self {
        Frames { preface_left: 0, header: [0; 9], have: 0, skip: 0 }
    }

    /// Whether the bytes so far end on a frame boundary.
    pub(crate) fn at_boundary(&self) -> bool {
        self.preface_left == 0 && self.have == 0 && self.skip == 0
    }

    /// How many more bytes may go by without passing a frame boundary: the rest of the
    /// header under way, or of its payload; 0 at a boundary. (A header's length is known
    /// only once it is whole, so inside a header this is the header's rest.)
    pub(crate) fn to_boundary(&self) -> usize {
        if self.preface_left > 0 {
            self.preface_left
        } else if self.have > 0 {
            9 - self.have
        } else {
            self.skip
        }
    }

    /// Follows `bytes`, calling `each` with every frame header they complete; stops early
    /// when `each` returns `false`.
    pub(crate) fn feed(&mut self, mut bytes: &[u8], mut each: impl FnMut(FrameHead) -> bool) {
        while !bytes.is_empty() {
            if self.preface_left > 0 || self.skip > 0 {
                let left = if self.preface_left > 0 { &mut self.preface_left } else { &mut self.skip };
                let n = (*left).min(bytes.len());
                *left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 9 {
                self.have = 0;
                let h = &self.header;
                self.skip = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                if !each(FrameHead { kind: h[3], flags: h[4], stream }) {
                    return;
                }
            }
        }
    }
}

/// The PINGs a client may send: `per_sec` a second on average, as many at once, and all of
/// them again whenever the server sends headers or data (a client may ping for bandwidth
/// estimates as data comes, and grpc-go's keepalive enforcement also forgives its strikes
/// then). The budget is kept as time, in nanoseconds: each PING costs a second / `per_sec`.
#[derive(Debug)]
pub(crate) struct PingBudget {
    cost: u64,
    full: u64,
    credit: u64,
    last: Option<Instant>,
}

impl PingBudget {
    pub(crate) fn new(per_sec: u32) -> Self {
        let cost = 1_000_000_000 / u64::from(per_sec.max(1));
        let full = cost * u64::from(per_sec.max(1));
        PingBudget { cost, full, credit: full, last: None }
    }

    /// Whether a PING at `now` is within the budget (and takes its share if so).
    pub(crate) fn ping(&mut self, now: Instant) -> bool {
        let earned = self.last.map_or(0, |last| now.saturating_duration_since(last).as_nanos());
        self.last = Some(now);
        self.credit = self.full.min(self.credit.saturating_add(u64::try_from(earned).unwrap_or(u64::MAX)));
        if self.credit < self.cost {
            return false;
        }
        self.credit -= self.cost;
        true
    }

    /// The server sent headers or data: the budget is full again.
    pub(crate) fn forgive(&mut self) {
        self.credit = self.full;
    }
}

/// What one connection's guard decided about the frames it saw.
#[derive(Debug)]
pub(crate) struct Guard {
    input: Frames,
    output: Frames,
    pings: Option<PingBudget>,
    per_sec: u32,
    /// The highest stream the client opened, for the GOAWAY.
    last_stream: u32,
    /// The streams open now: opened by the client's HEADERS, closed by the server's
    /// END_STREAM or a reset either way. Bounded by the streams the server lets be open.
    open: std::collections::HashSet<u32>,
    /// When the connection last had no stream open (since it was made, at first).
    idle_since: Instant,
}

/// Why a guard closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// More PINGs than allowed.
    TooManyPings,
    /// No stream open for the idle bound.
    Idle(Duration),
    /// The HTTP/2 preface did not come within the bound.
    NoPreface(Duration),
}

impl Guard {
    /// `max_pings_per_sec` 0: no limit on PINGs.
    pub(crate) fn new(max_pings_per_sec: u32, now: Instant) -> Self {
        Guard {
            input: Frames::from_client(),
            output: Frames::from_server(),
            pings: (max_pings_per_sec > 0).then(|| PingBudget::new(max_pings_per_sec)),
            per_sec: max_pings_per_sec,
            last_stream: 0,
            open: std::collections::HashSet::new(),
            idle_since: now,
        }
    }

    /// Whether the client's preface has come whole.
    pub(crate) fn preface_done(&self) -> bool {
        self.input.preface_left == 0
    }

    /// Streams open now.
    pub(crate) fn open_streams(&self) -> usize {
        self.open.len()
    }

    /// Since when no stream has been open (meaningful while none is).
    pub(crate) fn idle_since(&self) -> Instant {
        self.idle_since
    }

    fn closed(open: &mut std::collections::HashSet<u32>, idle_since: &mut Instant, stream: u32) {
        if open.remove(&stream) && open.is_empty() {
            *idle_since = Instant::now();
        }
    }

    /// Follows what the client sent; `Some` when the connection must be closed. `now` is
    /// asked only when a PING comes.
    pub(crate) fn read(&mut self, bytes: &[u8], now: impl Fn() -> Instant) -> Option<Verdict> {
        let (pings, last_stream) = (&mut self.pings, &mut self.last_stream);
        let (open, idle_since) = (&mut self.open, &mut self.idle_since);
        let mut verdict = None;
        self.input.feed(bytes, |f| {
            // A new stream: HEADERS on an odd stream above every one before it.
            if f.kind == HEADERS && f.stream % 2 == 1 && f.stream > *last_stream {
                *last_stream = f.stream;
                open.insert(f.stream);
            }
            if f.kind == RST_STREAM {
                Self::closed(open, idle_since, f.stream);
            }
            if f.kind == PING
                && f.flags & ACK == 0
                && let Some(budget) = pings.as_mut()
                && !budget.ping(now())
            {
                verdict = Some(Verdict::TooManyPings);
                return false;
            }
            true
        });
        verdict
    }

    /// Follows what the server wrote.
    pub(crate) fn wrote(&mut self, bytes: &[u8]) {
        let (pings, open, idle_since) = (&mut self.pings, &mut self.open, &mut self.idle_since);
        self.output.feed(bytes, |f| {
            if (f.kind == HEADERS || f.kind == DATA)
                && let Some(budget) = pings.as_mut()
            {
                budget.forgive();
            }
            let ends = (f.kind == HEADERS || f.kind == DATA) && f.flags & END_STREAM != 0;
            if ends || f.kind == RST_STREAM {
                Self::closed(open, idle_since, f.stream);
            }
            true
        });
    }

    /// Whether a frame of the guard's own can go out now without cutting one of the
    /// server's in two.
    pub(crate) fn can_interject(&self) -> bool {
        self.output.at_boundary()
    }

    /// How many bytes the server may still write before its next frame boundary, where a
    /// frame of the guard's own can go out.
    pub(crate) fn to_interjection(&self) -> usize {
        self.output.to_boundary()
    }

    /// The GOAWAY that tells the client why: ENHANCE_YOUR_CALM "too_many_pings", or
    /// NO_ERROR "idle" (a client dials again when it next calls); none before the preface.
    pub(crate) fn goaway(&self, verdict: Verdict) -> Option<Vec<u8>> {
        let (code, why) = match verdict {
            Verdict::TooManyPings => (ENHANCE_YOUR_CALM, TOO_MANY_PINGS),
            Verdict::Idle(_) => (NO_ERROR, IDLE),
            Verdict::NoPreface(_) => return None,
        };
        let mut frame = Vec::with_capacity(9 + 8 + why.len());
        let len = (8 + why.len()) as u32;
        frame.extend_from_slice(&len.to_be_bytes()[1..]);
        frame.extend_from_slice(&[0x7, 0]);
        frame.extend_from_slice(&0u32.to_be_bytes());
        frame.extend_from_slice(&self.last_stream.to_be_bytes());
        frame.extend_from_slice(&code.to_be_bytes());
        frame.extend_from_slice(why);
        Some(frame)
    }

    /// How the connection's reads end: an error that says why, or (idle) its end.
    /// `goaway_sent`: whether the GOAWAY went out (not when the server was half way through
    /// a frame of its own).
    pub(crate) fn end(&self, verdict: Verdict, goaway_sent: bool) -> std::io::Result<()> {
        let error = |why: String| Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
        let told = if goaway_sent {
            "GOAWAY ENHANCE_YOUR_CALM too_many_pings"
        } else {
            "no GOAWAY: the server's frame under way was not done within the linger"
        };
        match verdict {
            Verdict::TooManyPings => error(format!(
                "too many pings: more than {} a second with no headers or data from the server between them; connection closed ({told})",
                self.per_sec
            )),
            Verdict::NoPreface(within) => {
                error(format!("no HTTP/2 preface within {within:?} of the connection; closed"))
            }
            Verdict::Idle(_) => Ok(()),
        }
    }
}

/// How long a connection closed by its guard may take to finish the frame the server is
/// half way through (so that the GOAWAY does not cut it), and then to read what the client
/// still sends, so that the client reads the GOAWAY rather than a reset.
pub(crate) const LINGER: Duration = Duration::from_secs(1);

/// How much a closed connection reads and drops while it lingers.
pub(crate) const LINGER_BYTES: usize = 64 * 1024;

#[cfg(test)]
mod tests;
