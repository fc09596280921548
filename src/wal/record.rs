//! Byte layout of segment headers and batch records: encode and decode, no IO.
//!
//! Owns: the on-disk frame of the log (version 1, little-endian, described once, in
//! `docs/wal-format.md`; the structs below are that description in code).
//!
//! Must never: touch a file, decide what a bad frame *means* (torn or corrupt is recovery's
//! call), or look inside a payload (a batch of commands is opaque bytes here).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::WalCorruption;

/// The only format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"STLGWSEG";
/// First bytes of every batch record.
pub const RECORD_MAGIC: [u8; 4] = *b"STRC";
/// Size of the segment header at offset 0 of every segment.
pub const SEGMENT_HEADER_SIZE: u64 = 64;
/// Size of the header in front of every batch payload.
pub const RECORD_HEADER_SIZE: u64 = 48;
/// Records start at multiples of this offset; payloads are zero-padded up to it.
pub const RECORD_ALIGN: u64 = 16;

/// Segment header, at offset 0 of every segment file. 64 bytes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SegmentHeader {
    pub magic: [u8; 8],
    pub version: U16,
    pub header_size: U16,
    pub shard_id: U32,
    pub segment_index: U64,
    /// The lsn of the first record this segment holds (or will hold, if empty).
    pub first_lsn: U64,
    /// Size of the whole file, so a truncated copy is detected.
    pub segment_size: U64,
    pub reserved: [u8; 20],
    /// crc32c of bytes 0..60.
    pub checksum: U32,
}

/// Batch record header, followed by `payload_len` payload bytes and zero padding to 16. 48 bytes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RecordHeader {
    pub magic: [u8; 4],
    pub version: U16,
    /// Opaque to the log: what the payload is (the engine's batch kind).
    pub kind: U16,
    pub lsn: U64,
    pub timestamp: U64,
    pub payload_len: U32,
    pub payload_checksum: U32,
    /// Repeated from the segment header so a record copied between shards is caught.
    pub shard_id: U32,
    pub reserved: [u8; 8],
    /// crc32c of bytes 0..44 (which include the payload checksum).
    pub checksum: U32,
}

const _: () = assert!(core::mem::size_of::<SegmentHeader>() as u64 == SEGMENT_HEADER_SIZE);
const _: () = assert!(core::mem::size_of::<RecordHeader>() as u64 == RECORD_HEADER_SIZE);
const _: () = assert!(core::mem::align_of::<SegmentHeader>() == 1);
const _: () = assert!(core::mem::align_of::<RecordHeader>() == 1);
const _: () = assert!(SEGMENT_HEADER_SIZE.is_multiple_of(RECORD_ALIGN));
const _: () = assert!(RECORD_HEADER_SIZE.is_multiple_of(RECORD_ALIGN));

const SEGMENT_CHECKSUM_OFFSET: usize = 60;
const RECORD_CHECKSUM_OFFSET: usize = 44;

/// What a valid segment header says.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SegmentInfo {
    pub shard_id: u32,
    pub segment_index: u64,
    pub first_lsn: u64,
    pub segment_size: u64,
}

/// On-disk size of a record with a payload of `payload_len` bytes (header + payload + padding).
pub const fn record_size(payload_len: u64) -> u64 {
    RECORD_HEADER_SIZE + payload_len.div_ceil(RECORD_ALIGN) * RECORD_ALIGN
}

/// Largest payload a segment of `segment_size` bytes can hold.
pub const fn max_payload(segment_size: u64) -> u64 {
    let room = segment_size.saturating_sub(SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE);
    let aligned = room - room % RECORD_ALIGN;
    if aligned > u32::MAX as u64 {
        // u32::MAX rounded down to the alignment, so record_size(max) still fits.
        (u32::MAX as u64) - (u32::MAX as u64) % RECORD_ALIGN
    } else {
        aligned
    }
}

fn checksum_prefix<T: IntoBytes + Immutable>(header: &T, len: usize) -> u32 {
    crc32c::crc32c(header.as_bytes().get(..len).unwrap_or_default())
}

/// Encodes the header of segment `segment_index`.
pub fn encode_segment_header(info: SegmentInfo) -> SegmentHeader {
    let mut h = SegmentHeader {
        magic: SEGMENT_MAGIC,
        version: U16::new(FORMAT_VERSION),
        header_size: U16::new(SEGMENT_HEADER_SIZE as u16),
        shard_id: U32::new(info.shard_id),
        segment_index: U64::new(info.segment_index),
        first_lsn: U64::new(info.first_lsn),
        segment_size: U64::new(info.segment_size),
        reserved: [0; 20],
        checksum: U32::new(0),
    };
    h.checksum = U32::new(checksum_prefix(&h, SEGMENT_CHECKSUM_OFFSET));
    h
}

/// Decodes and verifies a segment header from the start of a segment file.
pub fn decode_segment_header(file: &[u8]) -> Result<SegmentInfo, WalCorruption> {
    let Ok((h, _)) = SegmentHeader::ref_from_prefix(file) else {
        return Err(WalCorruption::SegmentSize { expected: SEGMENT_HEADER_SIZE, found: file.len() as u64 });
    };
    if h.magic != SEGMENT_MAGIC {
        return Err(WalCorruption::BadMagic);
    }
    if h.checksum.get() != checksum_prefix(h, SEGMENT_CHECKSUM_OFFSET) {
        return Err(WalCorruption::HeaderChecksum);
    }
    // Checked after the checksum so a damaged header is reported as damage, not as a version.
    if h.version.get() != FORMAT_VERSION {
        return Err(WalCorruption::UnsupportedVersion { found: h.version.get() });
    }
    // Bounded, so that no lsn arithmetic on a hostile file (a header with a recomputed checksum)
    // can overflow: a segment holds far fewer records than the room left below u64::MAX.
    let first_lsn = h.first_lsn.get();
    if !(1..=super::LSN_MAX).contains(&first_lsn) {
        return Err(WalCorruption::LsnOutOfRange { first_lsn });
    }
    Ok(SegmentInfo {
        shard_id: h.shard_id.get(),
        segment_index: h.segment_index.get(),
        first_lsn: h.first_lsn.get(),
        segment_size: h.segment_size.get(),
    })
}

/// Encodes the header of a record; the payload follows it verbatim.
///
/// Panics if the payload is longer than `u32::MAX`; the writer refuses such payloads earlier
/// with a typed error, so reaching this is a bug.
pub fn encode_record_header(shard_id: u32, kind: u16, lsn: u64, timestamp: u64, payload: &[u8]) -> RecordHeader {
    let payload_len = u32::try_from(payload.len()).expect("payload length checked by the writer");
    let mut h = RecordHeader {
        magic: RECORD_MAGIC,
        version: U16::new(FORMAT_VERSION),
        kind: U16::new(kind),
        lsn: U64::new(lsn),
        timestamp: U64::new(timestamp),
        payload_len: U32::new(payload_len),
        payload_checksum: U32::new(crc32c::crc32c(payload)),
        shard_id: U32::new(shard_id),
        reserved: [0; 8],
        checksum: U32::new(0),
    };
    h.checksum = U32::new(checksum_prefix(&h, RECORD_CHECKSUM_OFFSET));
    h
}

/// A record whose header and payload checksums verify. The payload borrows the segment bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RecordView<'a> {
    pub lsn: u64,
    pub kind: u16,
    pub timestamp: u64,
    pub shard_id: u32,
    pub payload: &'a [u8],
    /// Bytes the record occupies on disk: header, payload and padding.
    pub size: u64,
}

/// What lies at one record offset.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Frame<'a> {
    /// A complete record whose checksums verify.
    Valid(RecordView<'a>),
    /// The header bytes are all zero: nothing was ever written here.
    Empty,
    /// Anything else: a torn write or damage (recovery decides which).
    Invalid(WalCorruption),
}

/// Decodes the record at the start of `rest` (the segment bytes from the record's offset to the
/// end of the segment).
pub fn decode_record(rest: &[u8]) -> Frame<'_> {
    let Ok((h, after)) = RecordHeader::ref_from_prefix(rest) else {
        return if rest.iter().all(|&b| b == 0) {
            Frame::Empty
        } else {
            Frame::Invalid(WalCorruption::RecordPastSegmentEnd { len: RECORD_HEADER_SIZE })
        };
    };
    if h.as_bytes().iter().all(|&b| b == 0) {
        return Frame::Empty;
    }
    if h.magic != RECORD_MAGIC {
        return Frame::Invalid(WalCorruption::BadMagic);
    }
    if h.checksum.get() != checksum_prefix(h, RECORD_CHECKSUM_OFFSET) {
        return Frame::Invalid(WalCorruption::HeaderChecksum);
    }
    if h.version.get() != FORMAT_VERSION {
        return Frame::Invalid(WalCorruption::UnsupportedVersion { found: h.version.get() });
    }
    let payload_len = u64::from(h.payload_len.get());
    let size = record_size(payload_len);
    // The padded record must fit, not just the payload: the writer never splits a record.
    let Some(payload) = usize::try_from(payload_len)
        .ok()
        .filter(|_| size - RECORD_HEADER_SIZE <= after.len() as u64)
        .and_then(|n| after.get(..n))
    else {
        return Frame::Invalid(WalCorruption::RecordPastSegmentEnd { len: size });
    };
    if crc32c::crc32c(payload) != h.payload_checksum.get() {
        return Frame::Invalid(WalCorruption::PayloadChecksum);
    }
    Frame::Valid(RecordView {
        lsn: h.lsn.get(),
        kind: h.kind.get(),
        timestamp: h.timestamp.get(),
        shard_id: h.shard_id.get(),
        payload,
        size,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let h = encode_record_header(3, 7, 42, 1_000, payload);
        let mut v = h.as_bytes().to_vec();
        v.extend_from_slice(payload);
        v.resize(record_size(payload.len() as u64) as usize, 0);
        v
    }

    #[test]
    fn record_roundtrip_and_padding() {
        for len in [0usize, 1, 15, 16, 17, 80, 1000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let bytes = frame(&payload);
            assert_eq!(bytes.len() as u64 % RECORD_ALIGN, 0);
            match decode_record(&bytes) {
                Frame::Valid(r) => {
                    assert_eq!((r.lsn, r.kind, r.timestamp, r.shard_id), (42, 7, 1_000, 3));
                    assert_eq!(r.payload, &payload[..]);
                    assert_eq!(r.size, bytes.len() as u64);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = frame(b"hello, ledger");
        let payload_end = RECORD_HEADER_SIZE as usize + 13;
        for bit in 0..payload_end * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(decode_record(&b), Frame::Invalid(_)), "bit {bit} undetected");
        }
    }

    #[test]
    fn zeros_and_short_tails() {
        assert_eq!(decode_record(&[0u8; 100]), Frame::Empty);
        assert_eq!(decode_record(&[0u8; 10]), Frame::Empty);
        assert!(matches!(decode_record(&[1u8; 10]), Frame::Invalid(_)));
        let bytes = frame(&[9u8; 100]);
        assert!(matches!(
            decode_record(&bytes[..bytes.len() - 1]),
            Frame::Invalid(WalCorruption::RecordPastSegmentEnd { .. })
        ));
    }

    #[test]
    fn a_segment_header_with_an_lsn_no_log_reaches_is_damage() {
        // Checksummed as the writer would (CRC-32C guards against accidents, not forgery).
        for first_lsn in [0, crate::wal::LSN_MAX + 1, u64::MAX] {
            let h = encode_segment_header(SegmentInfo { shard_id: 0, segment_index: 0, first_lsn, segment_size: 4096 });
            assert_eq!(decode_segment_header(h.as_bytes()), Err(WalCorruption::LsnOutOfRange { first_lsn }));
        }
        let info = SegmentInfo { shard_id: 0, segment_index: 0, first_lsn: crate::wal::LSN_MAX, segment_size: 4096 };
        assert_eq!(decode_segment_header(encode_segment_header(info).as_bytes()), Ok(info));
    }

    #[test]
    fn segment_header_roundtrip_and_damage() {
        let info = SegmentInfo { shard_id: 2, segment_index: 5, first_lsn: 99, segment_size: 65536 };
        let h = encode_segment_header(info);
        assert_eq!(decode_segment_header(h.as_bytes()), Ok(info));
        let mut b = h.as_bytes().to_vec();
        b[20] ^= 4;
        assert_eq!(decode_segment_header(&b), Err(WalCorruption::HeaderChecksum));
        b[0] = b'X';
        assert_eq!(decode_segment_header(&b), Err(WalCorruption::BadMagic));
        assert!(decode_segment_header(&b[..10]).is_err());
    }

    #[test]
    fn max_payload_fits() {
        for size in [4096u64, 65536, 64 << 20] {
            let m = max_payload(size);
            assert!(SEGMENT_HEADER_SIZE + record_size(m) <= size);
            assert!(SEGMENT_HEADER_SIZE + record_size(m + 1) > size);
        }
    }
}
