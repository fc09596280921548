//! Snapshot container: roundtrip, damage detection, fallback, retention, large sections.

use std::fs;
use std::path::Path;

use stormledger::error::SnapshotError;
use stormledger::snapshot::{
    list_snapshots, load_latest, load_latest_strict, load_snapshot, snapshot_file_name, write_snapshot, SnapshotMeta,
    FORMAT_VERSION, SNAPSHOTS_KEPT,
};

fn meta(n: u64) -> SnapshotMeta {
    SnapshotMeta { lsns: vec![n, n + 10, n + 20], timestamp: 1_700_000_000_000_000_000 + n }
}

fn write(dir: &Path, n: u64) -> std::path::PathBuf {
    let a: Vec<u8> = (0..1000u32).map(|i| (i * 7 + n as u32) as u8).collect();
    write_snapshot(dir, &meta(n), &[(1, &a), (2, b""), (7, b"accounts")]).unwrap().path
}

fn flip(path: &Path, offset: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset] ^= 0x01;
    fs::write(path, bytes).unwrap();
}

#[test]
fn roundtrip_with_sections_and_lsns() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(load_latest(tmp.path()).unwrap().is_none());
    assert!(load_latest(&tmp.path().join("missing")).unwrap().is_none());
    let path = write(tmp.path(), 5);
    assert_eq!(path, tmp.path().join(snapshot_file_name(1)));
    let s = load_latest(tmp.path()).unwrap().unwrap();
    assert_eq!((s.sequence, &s.meta, s.skipped.len()), (1, &meta(5), 0));
    assert_eq!(s.section(1).unwrap().len(), 1000);
    assert_eq!(s.section(2).unwrap(), b"");
    assert_eq!(s.section(7).unwrap(), b"accounts");
    assert!(s.section(3).is_none());
    let tags: Vec<u32> = s.sections().map(|(t, _)| t).collect();
    assert_eq!(tags, vec![1, 2, 7]);
    assert_eq!(s.len() % 64, 0);
}

#[test]
fn retention_keeps_the_newest_two() {
    let tmp = tempfile::tempdir().unwrap();
    for n in 1..=5 {
        write(tmp.path(), n);
    }
    let kept: Vec<u64> = list_snapshots(tmp.path()).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(kept, vec![4, 5]);
    assert_eq!(kept.len(), SNAPSHOTS_KEPT);
    assert_eq!(load_latest(tmp.path()).unwrap().unwrap().meta, meta(5));
}

#[test]
fn every_flipped_byte_is_detected_and_load_latest_falls_back() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), 1);
    let newest = write(tmp.path(), 2);
    let pristine = fs::read(&newest).unwrap();
    for offset in 0..pristine.len() {
        fs::write(&newest, &pristine).unwrap();
        flip(&newest, offset);
        let err = load_snapshot(&newest).expect_err("damage undetected");
        assert!(matches!(&err, SnapshotError::Corrupt { path, .. } if *path == newest), "{offset}: {err}");
        if offset % 97 == 0 {
            let s = load_latest(tmp.path()).unwrap().unwrap();
            assert_eq!(s.sequence, 1);
            assert_eq!(s.skipped.len(), 1);
            assert!(s.skipped[0].to_string().contains(&snapshot_file_name(2)));
            assert!(load_latest_strict(tmp.path()).is_err());
        }
    }
}

#[test]
fn truncated_snapshot_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), 1);
    let newest = write(tmp.path(), 2);
    let bytes = fs::read(&newest).unwrap();
    for cut in [0, 10, 63, 64, 200, bytes.len() - 1] {
        fs::write(&newest, &bytes[..cut]).unwrap();
        match load_snapshot(&newest) {
            Err(SnapshotError::Truncated { path, actual_len, .. }) => {
                assert_eq!((path, actual_len), (newest.clone(), cut as u64))
            }
            other => panic!("cut {cut}: {other:?}"),
        }
        assert_eq!(load_latest(tmp.path()).unwrap().unwrap().sequence, 1);
    }
    // Appended garbage is damage too.
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"junk");
    fs::write(&newest, &longer).unwrap();
    assert!(matches!(load_snapshot(&newest), Err(SnapshotError::Corrupt { .. })));
}

#[test]
fn no_valid_snapshot_is_an_error_not_an_empty_start() {
    let tmp = tempfile::tempdir().unwrap();
    let only = write(tmp.path(), 1);
    flip(&only, 300);
    match load_latest(tmp.path()) {
        Err(SnapshotError::NoneValid { rejected, .. }) => assert_eq!(rejected.len(), 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn tmp_files_are_ignored_and_cleaned_by_the_next_write() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), 1);
    let stale = tmp.path().join(format!("{}.tmp", snapshot_file_name(9)));
    fs::write(&stale, b"half a snapshot").unwrap();
    assert_eq!(load_latest(tmp.path()).unwrap().unwrap().sequence, 1);
    let written = write(tmp.path(), 2);
    assert_eq!(written, tmp.path().join(snapshot_file_name(2)));
    assert!(!stale.exists());
}

#[test]
fn large_section_roundtrips() {
    let tmp = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..300u64 << 20).map(|i| (i ^ (i >> 13)) as u8).collect();
    let w = write_snapshot(tmp.path(), &meta(1), &[(1, b"small"), (2, &big)]).unwrap();
    assert!(w.len > 300 << 20);
    let s = load_latest(tmp.path()).unwrap().unwrap();
    assert!(s.section(2).unwrap() == &big[..]);
    assert_eq!(s.section(1).unwrap(), b"small");
}

#[test]
fn another_format_version_is_refused_without_falling_back() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), 1);
    let newest = write(tmp.path(), 2);
    // An intact header (checksum recomputed) of version 1, the unreleased fixed-record layout,
    // and of a version from the future.
    for version in [1u16, FORMAT_VERSION + 1] {
        let mut bytes = fs::read(&newest).unwrap();
        bytes[8..10].copy_from_slice(&version.to_le_bytes());
        let checksum = crc32c::crc32c(&bytes[..60]);
        bytes[60..64].copy_from_slice(&checksum.to_le_bytes());
        fs::write(&newest, &bytes).unwrap();
        match load_snapshot(&newest) {
            Err(SnapshotError::UnsupportedVersion { path, version: v, supported }) => {
                assert_eq!((path, v, supported), (newest.clone(), version, FORMAT_VERSION))
            }
            other => panic!("{other:?}"),
        }
        // Not damage: the loader stops here instead of silently starting from the older file.
        let err = load_latest(tmp.path()).unwrap_err();
        assert!(matches!(err, SnapshotError::UnsupportedVersion { .. }), "{err}");
        assert!(err.to_string().contains(&format!("format version {version}")), "{err}");
    }
}
