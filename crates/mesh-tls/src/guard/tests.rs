use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Feeds `bytes` to the guard in pieces of `piece` bytes, as reads may cut them anywhere.
fn read(guard: &mut Guard, bytes: &[u8], piece: usize, now: Instant) -> Option<Verdict> {
    bytes.chunks(piece).find_map(|c| guard.read(c, || now))
}

fn ping() -> Vec<u8> {
    frame(PING, 0, 0, &[7; 8])
}

#[test]
fn pings_over_the_budget_are_refused_wherever_the_reads_cut_the_frames() {
    let t0 = Instant::now();
    for piece in [1, 5, 9, 17, 4096] {
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[0; 6]));
        for _ in 0..10 {
            bytes.extend(ping());
            bytes.extend(frame(PING, ACK, 0, &[7; 8])); // an ACK does not count
        }
        let mut guard = Guard::new(10, Instant::now());
        assert_eq!(read(&mut guard, &bytes, piece, t0), None, "ten pings are allowed");
        assert_eq!(read(&mut guard, &ping(), piece, t0), Some(Verdict::TooManyPings), "the eleventh is not");
    }
}

#[test]
fn other_client_frames_between_pings_do_not_reset_the_count() {
    // PING + WINDOW_UPDATE(+1) answered 400,000 times in 3 s when only pings in a row counted.
    let mut bytes = H2_PREFACE.to_vec();
    for _ in 0..11 {
        bytes.extend(ping());
        bytes.extend(frame(0x8, 0, 0, &[0, 0, 0, 1]));
    }
    let mut guard = Guard::new(10, Instant::now());
    assert_eq!(read(&mut guard, &bytes, 7, Instant::now()), Some(Verdict::TooManyPings));
}

#[test]
fn headers_or_data_from_the_server_forgive_the_pings_and_payloads_are_not_frames() {
    let t0 = Instant::now();
    let mut guard = Guard::new(10, Instant::now());
    assert_eq!(read(&mut guard, H2_PREFACE, 3, t0), None);
    for round in 0..100u32 {
        assert_eq!(read(&mut guard, &[ping(), ping(), ping()].concat(), 5, t0), None, "round {round}");
        // DATA (or HEADERS) to the client, written in pieces: it may ping again.
        let kind = if round % 2 == 0 { DATA } else { HEADERS };
        let data = frame(kind, 0, 1, &ping().repeat(20));
        data.chunks(11).for_each(|c| guard.wrote(c));
        assert!(guard.can_interject());
    }
    // A DATA frame from the client whose payload holds what would be PING headers.
    let mut guard = Guard::new(10, Instant::now());
    let bytes = [H2_PREFACE.to_vec(), frame(DATA, 0, 1, &ping().repeat(20))].concat();
    assert_eq!(read(&mut guard, &bytes, 7, t0), None);
}

#[test]
fn the_goaway_names_the_last_stream_the_client_opened_and_says_too_many_pings() {
    let mut guard = Guard::new(1, Instant::now());
    let bytes = [H2_PREFACE.to_vec(), frame(HEADERS, 0x4, 5, &[0; 3]), frame(HEADERS, 0x4, 3, &[0; 3])].concat();
    assert_eq!(read(&mut guard, &bytes, 4, Instant::now()), None);
    let goaway = guard.goaway(Verdict::TooManyPings).expect("a GOAWAY");
    assert_eq!(&goaway[3..5], &[0x7, 0]);
    assert_eq!(&goaway[9..13], &5u32.to_be_bytes(), "last stream");
    assert_eq!(&goaway[13..17], &ENHANCE_YOUR_CALM.to_be_bytes());
    assert_eq!(&goaway[17..], b"too_many_pings");
    assert_eq!(u32::from_be_bytes([0, goaway[0], goaway[1], goaway[2]]) as usize, goaway.len() - 9);
}

#[test]
fn the_server_side_is_at_a_boundary_only_between_its_frames() {
    let mut guard = Guard::new(10, Instant::now());
    assert!(guard.can_interject());
    let data = frame(DATA, 0, 1, &[1; 100]);
    guard.wrote(&data[..4]);
    assert!(!guard.can_interject(), "inside a header");
    guard.wrote(&data[4..50]);
    assert!(!guard.can_interject(), "inside a payload");
    guard.wrote(&data[50..]);
    assert!(guard.can_interject());
}

/// What happens at one moment (in milliseconds from the start).
#[derive(Debug, Clone, Copy)]
enum Event {
    Ping(u64),
    ServerData(u64),
}

/// The naive model: a bucket of `per_sec` tokens, each worth 1000 units, that gains
/// `per_sec` units in every millisecond, walked one millisecond at a time.
fn model(per_sec: u64, events: &[Event]) -> Vec<bool> {
    let full = per_sec * 1000;
    let (mut units, mut clock) = (full, 0u64);
    let mut out = Vec::new();
    for event in events {
        let at = match *event {
            Event::Ping(at) | Event::ServerData(at) => at,
        };
        while clock < at {
            clock += 1;
            units = (units + per_sec).min(full);
        }
        match event {
            Event::Ping(_) if units >= 1000 => {
                units -= 1000;
                out.push(true);
            }
            Event::Ping(_) => out.push(false),
            Event::ServerData(_) => units = full,
        }
    }
    out
}

proptest! {
    #[test]
    fn the_ping_budget_matches_a_bucket_walked_millisecond_by_millisecond(
        per_sec in prop::sample::select(vec![1u32, 2, 4, 5, 8, 10, 20, 25, 50, 100]),
        steps in prop::collection::vec((0u64..400, any::<bool>()), 1..200),
    ) {
        let t0 = Instant::now();
        let mut at = 0;
        let events: Vec<Event> = steps
            .iter()
            .map(|&(gap, data)| {
                at += gap;
                if data { Event::ServerData(at) } else { Event::Ping(at) }
            })
            .collect();
        let mut budget = PingBudget::new(per_sec);
        let mut got = Vec::new();
        for event in &events {
            match *event {
                Event::Ping(ms) => got.push(budget.ping(t0 + Duration::from_millis(ms))),
                Event::ServerData(_) => budget.forgive(),
            }
        }
        prop_assert_eq!(got, model(u64::from(per_sec), &events));
    }
}

#[test]
fn streams_are_open_from_the_clients_headers_to_the_servers_end_or_a_reset() {
    let t0 = Instant::now();
    let mut guard = Guard::new(10, t0);
    assert!(!guard.preface_done());
    assert_eq!(read(&mut guard, &H2_PREFACE[..10], 3, t0), None);
    assert!(!guard.preface_done(), "half a preface");
    let opened = [H2_PREFACE[10..].to_vec(), frame(HEADERS, 0x4, 1, &[0; 5]), frame(HEADERS, 0x4, 3, &[0; 5])].concat();
    assert_eq!(read(&mut guard, &opened, 4, t0), None);
    assert!(guard.preface_done());
    assert_eq!(guard.open_streams(), 2);
    // The client's trailers (HEADERS again on stream 1) open nothing new.
    assert_eq!(read(&mut guard, &frame(HEADERS, 0x5, 1, &[0; 2]), 9, t0), None);
    assert_eq!(guard.open_streams(), 2);
    // The server ends stream 1 with trailers; the client resets stream 3.
    guard.wrote(
        &[frame(HEADERS, 0x4, 1, &[0; 4]), frame(DATA, 0, 1, &[0; 30]), frame(HEADERS, 0x5, 1, &[0; 4])].concat(),
    );
    assert_eq!(guard.open_streams(), 1);
    assert_eq!(guard.idle_since(), t0, "not idle while stream 3 is open");
    assert_eq!(read(&mut guard, &frame(RST_STREAM, 0, 3, &[0, 0, 0, 8]), 5, t0), None);
    assert_eq!(guard.open_streams(), 0);
    assert!(guard.idle_since() > t0, "idle since stream 3 closed");
    // A stream the server refuses with a reset is closed too.
    assert_eq!(read(&mut guard, &frame(HEADERS, 0x4, 5, &[0; 5]), 5, t0), None);
    guard.wrote(&frame(RST_STREAM, 0, 5, &[0, 0, 0, 7]));
    assert_eq!(guard.open_streams(), 0);
}

#[test]
fn an_idle_connection_gets_goaway_no_error_and_one_without_a_preface_none() {
    let guard = Guard::new(10, Instant::now());
    let goaway = guard.goaway(Verdict::Idle(Duration::from_secs(1))).expect("a GOAWAY");
    assert_eq!(&goaway[13..17], &NO_ERROR.to_be_bytes());
    assert_eq!(&goaway[17..], b"idle");
    assert!(guard.end(Verdict::Idle(Duration::from_secs(1)), true).is_ok(), "an idle connection just ends");
    assert_eq!(guard.goaway(Verdict::NoPreface(Duration::from_secs(1))), None);
    assert!(guard.end(Verdict::NoPreface(Duration::from_secs(1)), false).is_err());
}

proptest! {
    /// Against the boundaries counted by hand (each frame 9 bytes and its payload): after
    /// any prefix, the guard is at a boundary exactly on one, and what it says is left to
    /// the next stays within the frame; written that far, twice at most, it is on the next.
    #[test]
    fn what_is_left_to_the_next_boundary_matches_the_frames_laid_end_to_end(
        lengths in proptest::collection::vec(0usize..300, 1..12),
        start in 0usize..4000,
    ) {
        let mut bytes = Vec::new();
        let mut boundaries = vec![0usize];
        for (i, len) in lengths.iter().enumerate() {
            bytes.extend(frame(DATA, 0, 2 * i as u32 + 1, &vec![7; *len]));
            boundaries.push(bytes.len());
        }
        let start = start % bytes.len();
        let mut guard = Guard::new(10, Instant::now());
        guard.wrote(&bytes[..start]);
        prop_assert_eq!(guard.can_interject(), boundaries.contains(&start));
        let next = *boundaries.iter().find(|b| **b > start).expect("a boundary after");
        let mut at = start;
        if !guard.can_interject() {
            for _ in 0..2 {
                let left = guard.to_interjection();
                prop_assert!(left > 0 && at + left <= next, "{} left at {} before {}", left, at, next);
                guard.wrote(&bytes[at..at + left]);
                at += left;
                if guard.can_interject() {
                    break;
                }
            }
            prop_assert_eq!(at, next);
            prop_assert!(guard.can_interject());
        } else {
            prop_assert_eq!(guard.to_interjection(), 0);
        }
    }
}
