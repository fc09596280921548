//! A generic, checksummed snapshot container: tagged byte sections plus the per-shard lsns the
//! snapshot covers.
//!
//! Owns: the `snapshot-NNNNNNNNNNNNNNNNNNNN.snap` files of a directory: writing them atomically
//! (write `*.snap.tmp`, fsync, rename, fsync the directory), verifying and loading them (one
//! mmap, checksums, zero-copy section slices), and retention (the `SNAPSHOTS_KEPT` newest).
//! The files go through a `storage::Storage` (the `*_in` functions): real files for the
//! server and tools, the in-memory crash image in simulation tests.
//!
//! Must never: interpret section contents (the engine owns what a section means), load a
//! snapshot whose checksums fail, write when loading, or treat a `.snap.tmp` file as a snapshot
//! (it is an unfinished write by definition).
//!
//! Retention and the log: a snapshot is only useful with the log records after it, so the
//! engine may retire log segments only below the lsns of the *oldest* kept snapshot; then
//! falling back to it (when the newest is damaged) still finds every record it needs.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]
#![deny(clippy::host_endian_bytes, clippy::big_endian_bytes)]

pub mod state;

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{SnapshotError, StorageError};
use crate::storage::{MmapStorage, OpenMode, Storage, StorageFile};

/// The only format version this build writes and reads. Version 1 (fixed 56-byte account
/// records) was never released; its files are refused with `SnapshotError::UnsupportedVersion`.
pub const FORMAT_VERSION: u16 = 2;
/// First bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"STLGSNAP";
/// How many snapshots `write_snapshot` keeps (the new one included).
pub const SNAPSHOTS_KEPT: usize = 2;
/// Sections start at multiples of this offset (cache line; lets readers cast records in place).
pub const SECTION_ALIGN: u64 = 64;
/// Limits checked on write and on load, so a damaged count cannot make the loader allocate.
pub const MAX_SHARDS: u32 = 4096;
pub const MAX_SECTIONS: u32 = 65_536;

const HEADER_SIZE: u64 = 64;
const SECTION_ENTRY_SIZE: u64 = 32;
const HEADER_CHECKSUM_OFFSET: usize = 60;

/// File header at offset 0. 64 bytes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct Header {
    magic: [u8; 8],
    version: U16,
    header_size: U16,
    shard_count: U32,
    sequence: U64,
    timestamp: U64,
    section_count: U32,
    reserved0: U32,
    /// Length of the whole file: a truncated copy is detected before any section is read.
    file_len: U64,
    /// crc32c of the lsn array and the section table.
    meta_checksum: U32,
    reserved1: [u8; 8],
    /// crc32c of bytes 0..60.
    checksum: U32,
}

/// One entry of the section table. 32 bytes.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct SectionEntry {
    tag: U32,
    reserved0: U32,
    offset: U64,
    len: U64,
    checksum: U32,
    reserved1: U32,
}

const _: () = assert!(core::mem::size_of::<Header>() as u64 == HEADER_SIZE);
const _: () = assert!(core::mem::size_of::<SectionEntry>() as u64 == SECTION_ENTRY_SIZE);

/// What a snapshot covers, beyond its sections.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct SnapshotMeta {
    /// Per shard (by shard id), the last log lsn whose effects the snapshot includes; replay
    /// starts at the next one.
    pub lsns: Vec<u64>,
    /// Engine time when the snapshot was taken (ns since the epoch).
    pub timestamp: u64,
}

/// Where a snapshot was written.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct WrittenSnapshot {
    pub path: PathBuf,
    pub sequence: u64,
    pub len: u64,
    /// Older snapshots removed by retention.
    pub removed: Vec<PathBuf>,
}

/// A verified snapshot, mapped read-only (real files); sections borrow the mapping.
pub struct LoadedSnapshot {
    pub path: PathBuf,
    pub sequence: u64,
    pub meta: SnapshotMeta,
    /// Newer snapshots that failed verification and were passed over (`load_latest` only).
    pub skipped: Vec<SnapshotError>,
    file: Box<dyn StorageFile>,
    sections: Vec<(u32, Range<usize>)>,
}

impl std::fmt::Debug for LoadedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedSnapshot")
            .field("path", &self.path)
            .field("sequence", &self.sequence)
            .field("meta", &self.meta)
            .field("skipped", &self.skipped)
            .field("len", &self.len())
            .finish()
    }
}

impl LoadedSnapshot {
    fn bytes(&self) -> &[u8] {
        self.file.bytes()
    }

    /// The first section with `tag`.
    pub fn section(&self, tag: u32) -> Option<&[u8]> {
        self.sections.iter().find(|(t, _)| *t == tag).and_then(|(_, r)| self.bytes().get(r.clone()))
    }

    /// All sections, in file order.
    pub fn sections(&self) -> impl Iterator<Item = (u32, &[u8])> {
        self.sections.iter().map(|(t, r)| (*t, self.bytes().get(r.clone()).unwrap_or_default()))
    }

    /// Total size of the file.
    pub fn len(&self) -> u64 {
        self.bytes().len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes().is_empty()
    }
}

/// `snapshot-00000000000000000042.snap`
pub fn snapshot_file_name(sequence: u64) -> String {
    format!("snapshot-{sequence:020}.snap")
}

fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("snapshot-")?.strip_suffix(".snap")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

/// The suffix of a snapshot set aside as damaged (`set_aside_in`).
pub const DAMAGED_SUFFIX: &str = ".damaged";

/// The sequence number of a snapshot's name, or of one set aside as damaged
/// (`snapshot-N.snap.damaged`, `snapshot-N.snap.damaged.K`).
fn parse_sequence_taken(name: &str) -> Option<u64> {
    if let Some(sequence) = parse_file_name(name) {
        return Some(sequence);
    }
    let rest = name.strip_prefix("snapshot-")?;
    let (digits, suffix) = rest.split_at_checked(20)?;
    let aside = suffix.strip_prefix(".snap")?.strip_prefix(DAMAGED_SUFFIX)?;
    let aside = aside.is_empty() || aside.strip_prefix('.').is_some_and(|k| k.bytes().all(|b| b.is_ascii_digit()));
    (aside && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

/// The sequence number the next snapshot in `dir` gets: one more than any snapshot's there,
/// damaged ones set aside included, so that a name is never used twice (the evidence of a
/// damaged snapshot is never overwritten by a later one's).
fn next_sequence_in(storage: &dyn Storage, dir: &Path) -> Result<u64, SnapshotError> {
    let names = storage.list(dir).map_err(storage_err)?;
    Ok(names.iter().filter_map(|name| parse_sequence_taken(name)).max().map_or(1, |s| s + 1))
}

/// Renames a snapshot that failed verification to `NAME.damaged` (or, were that taken,
/// `NAME.damaged.2`, ...: nothing is overwritten), and makes the rename durable: out of the
/// way of retention, which keeps the newest snapshots by name, but kept as evidence. Returns
/// the new path.
pub fn set_aside_in(storage: &dyn Storage, path: &Path) -> Result<PathBuf, SnapshotError> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(SnapshotError::Io {
            op: "set aside",
            path: path.to_path_buf(),
            source: io::Error::other("not a snapshot file's path"),
        });
    };
    let names = storage.list(dir).map_err(storage_err)?;
    let mut k = 1u64;
    let aside = loop {
        let candidate = if k == 1 { format!("{name}{DAMAGED_SUFFIX}") } else { format!("{name}{DAMAGED_SUFFIX}.{k}") };
        if !names.contains(&candidate) {
            break dir.join(candidate);
        }
        k += 1;
    };
    storage.rename(path, &aside).map_err(storage_err)?;
    storage.sync_dir(dir).map_err(storage_err)?;
    Ok(aside)
}

/// A storage failure as a snapshot error (the storage layer names the call and the path).
fn storage_err(error: StorageError) -> SnapshotError {
    match error {
        StorageError::Io { op, path, source } => SnapshotError::Io { op, path, source },
        other => SnapshotError::Io { op: "storage", path: PathBuf::new(), source: io::Error::other(other.to_string()) },
    }
}

/// The snapshots in `dir` (final names only), oldest first. A missing directory has none.
pub fn list_snapshots(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SnapshotError> {
    list_snapshots_in(&MmapStorage, dir)
}

/// `list_snapshots` on `storage`.
pub fn list_snapshots_in(storage: &dyn Storage, dir: &Path) -> Result<Vec<(u64, PathBuf)>, SnapshotError> {
    let names = match storage.list(dir) {
        Ok(names) => names,
        Err(StorageError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(storage_err(e)),
    };
    let mut found: Vec<(u64, PathBuf)> =
        names.iter().filter_map(|name| parse_file_name(name).map(|seq| (seq, dir.join(name)))).collect();
    found.sort();
    Ok(found)
}

const fn align_up(n: u64) -> u64 {
    n.div_ceil(SECTION_ALIGN) * SECTION_ALIGN
}

/// Writes a new snapshot into `dir` with the next sequence number, atomically, then removes all
/// but the `SNAPSHOTS_KEPT` newest snapshots and any leftover `.snap.tmp` files.
pub fn write_snapshot(
    dir: &Path,
    meta: &SnapshotMeta,
    sections: &[(u32, &[u8])],
) -> Result<WrittenSnapshot, SnapshotError> {
    write_snapshot_in(&MmapStorage, dir, meta, sections)
}

/// `write_snapshot` on `storage`.
pub fn write_snapshot_in(
    storage: &dyn Storage,
    dir: &Path,
    meta: &SnapshotMeta,
    sections: &[(u32, &[u8])],
) -> Result<WrittenSnapshot, SnapshotError> {
    let shard_count = u32::try_from(meta.lsns.len())
        .ok()
        .filter(|&n| n <= MAX_SHARDS)
        .ok_or_else(|| SnapshotError::TooLarge { reason: format!("{} shards (max {MAX_SHARDS})", meta.lsns.len()) })?;
    let section_count = u32::try_from(sections.len()).ok().filter(|&n| n <= MAX_SECTIONS).ok_or_else(|| {
        SnapshotError::TooLarge { reason: format!("{} sections (max {MAX_SECTIONS})", sections.len()) }
    })?;
    storage.create_dir_all(dir).map_err(storage_err)?;
    let sequence = next_sequence_in(storage, dir)?;

    // Layout: header, lsns, section table, then each section at an aligned offset.
    let lsns: Vec<U64> = meta.lsns.iter().map(|&l| U64::new(l)).collect();
    let meta_start = HEADER_SIZE;
    let table_start = meta_start + 8 * u64::from(shard_count);
    let mut offset = align_up(table_start + SECTION_ENTRY_SIZE * u64::from(section_count));
    let mut table = Vec::with_capacity(sections.len());
    for (tag, data) in sections {
        table.push(SectionEntry {
            tag: U32::new(*tag),
            reserved0: U32::new(0),
            offset: U64::new(offset),
            len: U64::new(data.len() as u64),
            checksum: U32::new(crc32c::crc32c(data)),
            reserved1: U32::new(0),
        });
        offset = align_up(offset + data.len() as u64);
    }
    let file_len = offset;
    let meta_checksum = crc32c::crc32c_append(crc32c::crc32c(lsns.as_bytes()), table.as_bytes());
    let mut header = Header {
        magic: MAGIC,
        version: U16::new(FORMAT_VERSION),
        header_size: U16::new(HEADER_SIZE as u16),
        shard_count: U32::new(shard_count),
        sequence: U64::new(sequence),
        timestamp: U64::new(meta.timestamp),
        section_count: U32::new(section_count),
        reserved0: U32::new(0),
        file_len: U64::new(file_len),
        meta_checksum: U32::new(meta_checksum),
        reserved1: [0; 8],
        checksum: U32::new(0),
    };
    header.checksum = U32::new(crc32c::crc32c(header.as_bytes().get(..HEADER_CHECKSUM_OFFSET).unwrap_or_default()));

    let path = dir.join(snapshot_file_name(sequence));
    let tmp = dir.join(format!("{}.tmp", snapshot_file_name(sequence)));
    remove_stale_tmp(storage, dir)?;
    // The file, in order: header, lsns, section table, then each section, each padded to
    // `SECTION_ALIGN` with zeros.
    const ZEROS: [u8; SECTION_ALIGN as usize] = [0; SECTION_ALIGN as usize];
    let pad = |at: u64| ZEROS.get(..(align_up(at) - at) as usize).unwrap_or_default();
    let mut chunks: Vec<&[u8]> = vec![header.as_bytes(), lsns.as_bytes(), table.as_bytes()];
    chunks.push(pad(table_start + SECTION_ENTRY_SIZE * u64::from(section_count)));
    for (entry, (_, data)) in table.iter().zip(sections) {
        chunks.push(data);
        chunks.push(pad(entry.offset.get() + data.len() as u64));
    }
    storage.write_file(&tmp, &chunks).map_err(storage_err)?;
    storage.rename(&tmp, &path).map_err(storage_err)?;
    storage.sync_dir(dir).map_err(storage_err)?;

    // Retention, only after the new snapshot is durable under its final name.
    let all = list_snapshots_in(storage, dir)?;
    let mut removed = Vec::new();
    for (_, old) in all.iter().take(all.len().saturating_sub(SNAPSHOTS_KEPT)) {
        storage.remove(old).map_err(storage_err)?;
        removed.push(old.clone());
    }
    if !removed.is_empty() {
        storage.sync_dir(dir).map_err(storage_err)?;
    }
    Ok(WrittenSnapshot { path, sequence, len: file_len, removed })
}

fn remove_stale_tmp(storage: &dyn Storage, dir: &Path) -> Result<(), SnapshotError> {
    for name in storage.list(dir).map_err(storage_err)? {
        if name.strip_suffix(".tmp").is_some_and(|n| parse_file_name(n).is_some()) {
            storage.remove(&dir.join(name)).map_err(storage_err)?;
        }
    }
    Ok(())
}

/// Opens and fully verifies one snapshot file: every checksum, every length, zero padding.
pub fn load_snapshot(path: &Path) -> Result<LoadedSnapshot, SnapshotError> {
    load_snapshot_in(&MmapStorage, path)
}

/// `load_snapshot` on `storage`.
pub fn load_snapshot_in(storage: &dyn Storage, path: &Path) -> Result<LoadedSnapshot, SnapshotError> {
    // Real files are mapped read-only; snapshot files are never modified after their rename.
    let file = storage.open(path, OpenMode::ReadOnly).map_err(storage_err)?;
    let actual_len = file.size();
    if actual_len < HEADER_SIZE {
        return Err(SnapshotError::Truncated { path: path.to_path_buf(), expected_len: HEADER_SIZE, actual_len });
    }
    let (meta, sequence, sections) = verify(path, file.bytes())?;
    Ok(LoadedSnapshot { path: path.to_path_buf(), sequence, meta, skipped: Vec::new(), file, sections })
}

type Verified = (SnapshotMeta, u64, Vec<(u32, Range<usize>)>);

fn verify(path: &Path, bytes: &[u8]) -> Result<Verified, SnapshotError> {
    let corrupt = |offset: u64, reason: String| SnapshotError::Corrupt { path: path.to_path_buf(), offset, reason };
    let actual_len = bytes.len() as u64;
    let Ok((h, _)) = Header::ref_from_prefix(bytes) else {
        return Err(SnapshotError::Truncated { path: path.to_path_buf(), expected_len: HEADER_SIZE, actual_len });
    };
    if h.magic != MAGIC {
        return Err(corrupt(0, "bad magic".into()));
    }
    let header_crc = crc32c::crc32c(h.as_bytes().get(..HEADER_CHECKSUM_OFFSET).unwrap_or_default());
    if h.checksum.get() != header_crc {
        return Err(corrupt(0, "header checksum mismatch".into()));
    }
    if h.version.get() != FORMAT_VERSION {
        // An intact header of another version: not damage, so no fallback to an older file.
        return Err(SnapshotError::UnsupportedVersion {
            path: path.to_path_buf(),
            version: h.version.get(),
            supported: FORMAT_VERSION,
        });
    }
    let file_len = h.file_len.get();
    if actual_len < file_len {
        return Err(SnapshotError::Truncated { path: path.to_path_buf(), expected_len: file_len, actual_len });
    }
    if actual_len > file_len {
        return Err(corrupt(file_len, format!("{} unexpected bytes after the end", actual_len - file_len)));
    }
    if h.shard_count.get() > MAX_SHARDS || h.section_count.get() > MAX_SECTIONS {
        return Err(corrupt(12, "shard or section count out of range".into()));
    }
    if let Some(named) = path.file_name().and_then(|n| n.to_str()).and_then(parse_file_name) {
        if named != h.sequence.get() {
            return Err(corrupt(16, format!("header sequence {} differs from file name", h.sequence.get())));
        }
    }
    let rest = bytes.get(HEADER_SIZE as usize..).unwrap_or_default();
    let Ok((lsns, rest)) = <[U64]>::ref_from_prefix_with_elems(rest, h.shard_count.get() as usize) else {
        return Err(corrupt(HEADER_SIZE, "lsn array runs past the end".into()));
    };
    let Ok((table, _)) = <[SectionEntry]>::ref_from_prefix_with_elems(rest, h.section_count.get() as usize) else {
        return Err(corrupt(HEADER_SIZE, "section table runs past the end".into()));
    };
    let meta_crc = crc32c::crc32c_append(crc32c::crc32c(lsns.as_bytes()), table.as_bytes());
    if h.meta_checksum.get() != meta_crc {
        return Err(corrupt(HEADER_SIZE, "lsn/section table checksum mismatch".into()));
    }
    // Sections must be laid out exactly as the writer does; every byte between them is zero.
    let table_end = HEADER_SIZE + lsns.as_bytes().len() as u64 + table.as_bytes().len() as u64;
    let mut expected = align_up(table_end);
    let mut zero_from = table_end;
    let mut sections = Vec::with_capacity(table.len());
    for (i, e) in table.iter().enumerate() {
        let (offset, len) = (e.offset.get(), e.len.get());
        let end = offset.checked_add(len).filter(|&end| offset == expected && end <= file_len);
        let Some(end) = end else {
            return Err(corrupt(offset, format!("section {i} (tag {}) has a bad offset or length", e.tag.get())));
        };
        check_zero(path, bytes, zero_from, offset)?;
        let range = offset as usize..end as usize;
        let data = bytes.get(range.clone()).unwrap_or_default();
        if crc32c::crc32c(data) != e.checksum.get() {
            return Err(corrupt(offset, format!("section {i} (tag {}) checksum mismatch", e.tag.get())));
        }
        sections.push((e.tag.get(), range));
        zero_from = end;
        expected = align_up(end);
    }
    if expected != file_len {
        return Err(corrupt(expected, "file length does not match the section table".into()));
    }
    check_zero(path, bytes, zero_from, file_len)?;
    let meta = SnapshotMeta { lsns: lsns.iter().map(|l| l.get()).collect(), timestamp: h.timestamp.get() };
    Ok((meta, h.sequence.get(), sections))
}

fn check_zero(path: &Path, bytes: &[u8], from: u64, to: u64) -> Result<(), SnapshotError> {
    let padding = bytes.get(from as usize..to as usize).unwrap_or_default();
    match padding.iter().position(|&b| b != 0) {
        None => Ok(()),
        Some(p) => Err(SnapshotError::Corrupt {
            path: path.to_path_buf(),
            offset: from + p as u64,
            reason: "non-zero padding".into(),
        }),
    }
}

/// The newest snapshot in `dir` that verifies, or `None` if there are none at all.
///
/// Newer snapshots that fail verification (corrupt or truncated) are passed over and listed in
/// `LoadedSnapshot::skipped`; the caller must surface them. If snapshots exist but none
/// verifies, that is an error (`NoneValid`), never `None`: starting from an empty state would
/// silently lose everything the retired log held. A snapshot of another format version is an
/// error at once (`UnsupportedVersion`): it is not damaged, and an older file would not help.
pub fn load_latest(dir: &Path) -> Result<Option<LoadedSnapshot>, SnapshotError> {
    load_latest_in(&MmapStorage, dir)
}

/// `load_latest` on `storage`.
pub fn load_latest_in(storage: &dyn Storage, dir: &Path) -> Result<Option<LoadedSnapshot>, SnapshotError> {
    let mut skipped = Vec::new();
    for (_, path) in list_snapshots_in(storage, dir)?.iter().rev() {
        match load_snapshot_in(storage, path) {
            Ok(mut s) => {
                s.skipped = skipped;
                return Ok(Some(s));
            }
            Err(e @ (SnapshotError::Corrupt { .. } | SnapshotError::Truncated { .. })) => skipped.push(e),
            Err(e) => return Err(e),
        }
    }
    if skipped.is_empty() {
        Ok(None)
    } else {
        Err(SnapshotError::NoneValid { dir: dir.to_path_buf(), rejected: skipped })
    }
}

/// Strict variant: the newest snapshot must verify; no fallback. (`stormledger-recover verify`
/// does not use it: it loads the shard as a start does, then checks every kept snapshot.)
pub fn load_latest_strict(dir: &Path) -> Result<Option<LoadedSnapshot>, SnapshotError> {
    match list_snapshots(dir)?.last() {
        None => Ok(None),
        Some((_, path)) => load_snapshot(path).map(Some),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn a_written_snapshot_survives_a_power_loss_right_after() {
        use crate::storage::{Crash, MemStorage};
        let storage = MemStorage::new();
        let dir = Path::new("/mem/snapshots");
        let meta = SnapshotMeta { lsns: vec![7], timestamp: 1 };
        // The first snapshot of a directory: no retention pass after it syncs the directory.
        let written = write_snapshot_in(&storage, dir, &meta, &[(1, b"x".as_slice())]).unwrap();
        let image = storage.crash(Crash::PowerLoss);
        let loaded = load_latest_in(&image, dir).unwrap().expect("the snapshot's name is durable");
        assert_eq!((loaded.path, loaded.meta.lsns), (written.path, vec![7]));
    }

    #[test]
    fn a_damaged_snapshots_number_is_never_reused_nor_its_file_overwritten() {
        let storage = crate::storage::MemStorage::new();
        let dir = Path::new("/mem/snapshots");
        let meta = SnapshotMeta { lsns: vec![7], timestamp: 1 };
        let write = || write_snapshot_in(&storage, dir, &meta, &[(1, b"x".as_slice())]).unwrap();
        assert_eq!(write().sequence, 1);
        let second = write();
        let aside = set_aside_in(&storage, &second.path).unwrap();
        assert_eq!(aside, dir.join("snapshot-00000000000000000002.snap.damaged"));
        let third = write();
        assert_eq!(third.sequence, 3, "not 2 again");
        // A name taken already (a directory from a build that reused numbers) is not overwritten.
        storage.rename(&third.path, &second.path).unwrap();
        assert_eq!(
            set_aside_in(&storage, &second.path).unwrap(),
            dir.join("snapshot-00000000000000000002.snap.damaged.2")
        );
        assert_eq!(write().sequence, 3);
        let mut names = storage.list(dir).unwrap();
        names.sort();
        assert_eq!(
            names,
            [
                "snapshot-00000000000000000001.snap",
                "snapshot-00000000000000000002.snap.damaged",
                "snapshot-00000000000000000002.snap.damaged.2",
                "snapshot-00000000000000000003.snap",
            ]
        );
        for name in [
            "snapshot-1.snap.damaged",
            "snapshot-00000000000000000009.snap.damagedx",
            "snapshot-00000000000000000009.snap.tmp",
        ] {
            assert_eq!(parse_sequence_taken(name), None, "{name}");
        }
    }
}
