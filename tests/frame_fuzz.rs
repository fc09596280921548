//! Generated-input tests of the frame decoder: well over 100 000 inputs (random bytes, random
//! headers that pass the header checksum, mutated valid frames, truncations, split streams).
//!
//! Properties:
//! - the decoder never panics;
//! - a truncated frame is `Incomplete`, never an error and never a frame;
//! - a mutated frame either fails to parse or decodes to exactly the original frame (a checksum
//!   collision is the only way to get anything else), so a frame that fails to parse never yields
//!   commands and a corrupted one never yields different commands;
//! - anything that does decode re-encodes to the same bytes (the encoding is canonical).
//!
//! The generator is seeded; a failure prints the seed and case number so it can be replayed.

use proptest::prelude::*;
use stormledger::layout::{CommandRecord, HistoryRecord, QueryRecord, ReplyRecord};
use stormledger::protocol::{
    decode, AuthOk, ErrorBody, ErrorCode, Frame, FrameHeader, Hello, Payload, ProtocolError, QueryAnswer, Role,
    HEADER_SIZE, MAGIC,
};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

const SEED: u64 = 0x5eed_1ed9_e500_0001;

/// xorshift64*: tiny, deterministic, good enough to spread bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
    fn record<T: FromBytes + IntoBytes>(&mut self) -> T {
        let bytes = self.bytes(core::mem::size_of::<T>());
        T::read_from_bytes(&bytes).unwrap_or_else(|_| unreachable!("sized exactly"))
    }
}

/// A random valid frame of any kind.
fn valid_frame(rng: &mut Rng) -> Frame {
    let request_id = rng.next();
    let count = 1 + rng.below(6);
    let payload = match rng.below(10) {
        0 => Payload::Hello(Hello {
            role: Role::Client,
            token: {
                let len = rng.below(121);
                rng.bytes(len)
            },
        }),
        1 => Payload::AuthOk(AuthOk {
            role: Role::Admin,
            in_flight_max: rng.next() as u32,
            body_bytes_max: rng.next() as u32,
            commands_per_frame_max: rng.next() as u32,
            queries_per_frame_max: rng.next() as u32,
            connection_id: rng.next(),
        }),
        2 => Payload::Error(ErrorBody::new(ErrorCode(rng.next() as u16), "bad thing".repeat(rng.below(14)))),
        3 => Payload::Commands((0..count).map(|_| rng.record::<CommandRecord>()).collect()),
        4 => Payload::Replies((0..count).map(|_| rng.record::<ReplyRecord>()).collect()),
        5 => Payload::Query((0..count).map(|_| rng.record::<QueryRecord>()).collect()),
        6 => Payload::QueryAnswer(
            (0..count)
                .map(|_| QueryAnswer {
                    reply: rng.record(),
                    command: if rng.below(2) == 0 { Some(rng.record()) } else { None },
                    history: (0..rng.below(4)).map(|_| rng.record::<HistoryRecord>()).collect(),
                    next_before_ts: rng.next(),
                    next_before_shard: rng.next(),
                })
                .collect(),
        ),
        7 => Payload::AuthFailed(ErrorBody::new(ErrorCode::AUTH_FAILED, "no")),
        8 => Payload::Ping,
        _ => Payload::Pong,
    };
    Frame::new(request_id, payload)
}

fn encode(frame: &Frame) -> Vec<u8> {
    let mut bytes = Vec::new();
    frame.encode(&mut bytes).unwrap_or_else(|error| panic!("valid frame must encode: {error}"));
    bytes
}

/// Decodes `bytes`; whatever decodes must re-encode to exactly the bytes it came from.
fn decode_checked(bytes: &[u8], case: &str) -> Result<Option<Frame>, ProtocolError> {
    let decoded = decode(bytes)?;
    Ok(decoded.map(|(frame, len)| {
        assert!(len <= bytes.len(), "{case}: consumed more than given");
        assert_eq!(encode(&frame), bytes[..len], "{case}: decoded frame is not canonical");
        frame
    }))
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(SEED);
    for case in 0..40_000 {
        let len = rng.below(400);
        let mut bytes = rng.bytes(len);
        // Most purely random inputs die at the magic check; give half of them a valid magic and
        // version so the later checks see random input too.
        if case % 2 == 0 && bytes.len() >= 6 {
            bytes[..4].copy_from_slice(&MAGIC);
            bytes[4..6].copy_from_slice(&1u16.to_le_bytes());
        }
        let _ = decode_checked(&bytes, &format!("seed {SEED:#x} random case {case}"));
    }
}

#[test]
fn random_headers_with_valid_checksums_never_panic() {
    let mut rng = Rng(SEED ^ 1);
    let mut decoded = 0;
    for case in 0..30_000 {
        let mut header: FrameHeader = rng.record();
        header.magic = MAGIC;
        header.version = U16::new(1);
        header.kind = U16::new(1 + rng.below(13) as u16);
        if rng.below(4) != 0 {
            header.flags = U16::new(0);
            header.reserved = U16::new(0);
            header.reserved2 = U32::new(0);
        }
        let body_len = [0, 32, 64, 80, 128, 160, 240, rng.below(700)][rng.below(8)];
        header.body_len = U32::new(body_len as u32);
        header.count = U32::new(rng.below(6) as u32);
        let body = rng.bytes(body_len);
        if rng.below(2) == 0 {
            header.body_crc = U32::new(crc32c::crc32c(&body));
        }
        header.seal();
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend_from_slice(&body);
        if let Ok(Some(_)) = decode_checked(&bytes, &format!("seed {SEED:#x} header case {case}")) {
            decoded += 1;
        }
    }
    // The generator must reach the body decoders, not just the header checks.
    assert!(decoded > 100, "only {decoded} random frames decoded");
}

#[test]
fn mutated_frames_fail_or_decode_to_the_original() {
    let mut rng = Rng(SEED ^ 2);
    for case in 0..40_000 {
        let frame = valid_frame(&mut rng);
        let mut bytes = encode(&frame);
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(bytes.len());
            bytes[at] ^= 1 + rng.below(255) as u8;
        }
        let label = format!("seed {SEED:#x} mutation case {case}");
        match decode_checked(&bytes, &label) {
            Err(_) | Ok(None) => {}
            Ok(Some(decoded)) => assert_eq!(decoded, frame, "{label}: a corrupted frame decoded to something else"),
        }
    }
}

#[test]
fn truncated_frames_are_incomplete() {
    let mut rng = Rng(SEED ^ 3);
    let mut cases = 0;
    for _ in 0..400 {
        let frame = valid_frame(&mut rng);
        let bytes = encode(&frame);
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), Ok(None), "prefix of {cut} bytes of {frame:?}");
            cases += 1;
        }
        assert_eq!(decode(&bytes), Ok(Some((frame, bytes.len()))));
    }
    assert!(cases > 10_000);
}

#[test]
fn split_streams_yield_the_same_frames() {
    let mut rng = Rng(SEED ^ 4);
    for _ in 0..500 {
        let frames: Vec<Frame> = (0..1 + rng.below(8)).map(|_| valid_frame(&mut rng)).collect();
        let stream: Vec<u8> = frames.iter().flat_map(encode).collect();
        // Feed the stream in random chunks, decoding as the bytes arrive.
        let mut buffer = Vec::new();
        let mut got = Vec::new();
        let mut fed = 0;
        while fed < stream.len() {
            let chunk = 1 + rng.below(300);
            let end = (fed + chunk).min(stream.len());
            buffer.extend_from_slice(&stream[fed..end]);
            fed = end;
            while let Some((frame, len)) = decode(&buffer).expect("valid stream") {
                buffer.drain(..len);
                got.push(frame);
            }
        }
        assert!(buffer.is_empty());
        assert_eq!(got, frames);
    }
}

#[test]
fn header_size_is_what_the_docs_say() {
    assert_eq!(HEADER_SIZE, 40);
    // The check value quoted in docs/protocol.md, so other implementations can verify their CRC.
    assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    let frame = Frame::new(0x0102_0304_0506_0708, Payload::Ping);
    let bytes = encode(&frame);
    assert_eq!(&bytes[..4], b"SLDG");
    assert_eq!(&bytes[4..6], &[1, 0]);
    assert_eq!(&bytes[6..8], &[11, 0]);
    assert_eq!(&bytes[16..24], &[8, 7, 6, 5, 4, 3, 2, 1]);
    let header = FrameHeader::read_from_bytes(&bytes[..HEADER_SIZE]).expect("header");
    assert_eq!(header.header_crc.get(), crc32c::crc32c(&bytes[..36]));
    assert_eq!(header.request_id, U64::new(0x0102_0304_0506_0708));
}

/// 3000 cases in CI; `PROPTEST_CASES=N` runs more (a config with its own count ignores it).
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(3000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn proptest_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode_checked(&bytes, "proptest");
    }

    #[test]
    fn proptest_commands_survive_or_fail_whole(
        ids in proptest::collection::vec(any::<u64>(), 1..20),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..), 0..4),
    ) {
        let commands: Vec<CommandRecord> =
            ids.iter().map(|&id| CommandRecord { id: U64::new(id), kind: 5, ..CommandRecord::default() }).collect();
        let frame = Frame::new(1, Payload::Commands(commands));
        let mut bytes = encode(&frame);
        for (at, mask) in &flips {
            let at = at.index(bytes.len());
            bytes[at] ^= mask;
        }
        match decode(&bytes) {
            Ok(Some((decoded, _))) => prop_assert_eq!(decoded, frame),
            Ok(None) | Err(_) => prop_assert!(!flips.is_empty()),
        }
    }
}
