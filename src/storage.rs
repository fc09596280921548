//! The narrow file interface the write-ahead log writes through, and its implementations.
//!
//! Owns: how bytes reach a file and when they are durable. Three implementations:
//! - [`MmapStorage`]: real files, space reserved with `posix_fallocate` at creation (so a full
//!   disk is an error at allocation time, never a SIGBUS on a later store into the mapping),
//!   mapped with `MmapMut`; a write is a copy into the mapping (or, `write_unmapped`, a
//!   `pwrite` to the same file), a sync is `msync(MS_SYNC)` of the written range (on Linux this
//!   is `fdatasync` restricted to that range).
//! - [`FaultyStorage`]: wraps another storage and fails the Nth write, sync or allocation, so the
//!   error paths of the log run in tests.
//! - [`MemStorage`]: an in-memory crash image that keeps live bytes (what the process sees) and
//!   durable bytes (what survives power loss) apart, and can "crash" into a new image.
//!
//! Also [`DirLock`], the exclusive lock on a data directory.
//!
//! Must never: interpret file contents, retry a failed sync (after a failed fsync the kernel may
//! have dropped the dirty pages, so a retry can report success for data that is gone), or make
//! anything durable implicitly. Durability happens only in `sync` and `sync_dir`.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::{Mmap, MmapMut};
use parking_lot::Mutex;

use crate::error::StorageError;

/// How to open an existing file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OpenMode {
    /// Map read-only; writes are refused. Used by verify/inspect, which must never write.
    ReadOnly,
    /// Map read-write.
    ReadWrite,
}

/// A directory of files. Implementations must be usable from several threads.
pub trait Storage: Send + Sync {
    /// Creates `dir` and its parents if missing.
    fn create_dir_all(&self, dir: &Path) -> Result<(), StorageError>;
    /// Names (not paths) of the entries of `dir`, in no particular order.
    fn list(&self, dir: &Path) -> Result<Vec<String>, StorageError>;
    /// Creates a new file of exactly `len` bytes, all space reserved and reading as zeros, and
    /// makes the allocation durable. The *name* is durable only after `sync_dir`.
    /// Fails if the file exists.
    fn allocate(&self, path: &Path, len: u64) -> Result<Box<dyn StorageFile>, StorageError>;
    /// Opens an existing file.
    fn open(&self, path: &Path, mode: OpenMode) -> Result<Box<dyn StorageFile>, StorageError>;
    /// Creates a new file holding `chunks` one after another and makes its contents durable;
    /// the *name* is durable only after `sync_dir`. Fails if the file exists. For files written
    /// once, whole (snapshots); the log's fixed-size segments use `allocate`.
    fn write_file(&self, path: &Path, chunks: &[&[u8]]) -> Result<(), StorageError>;
    /// Renames a file (atomic on POSIX). Durable only after `sync_dir`.
    fn rename(&self, from: &Path, to: &Path) -> Result<(), StorageError>;
    /// Removes a file. Durable only after `sync_dir`.
    fn remove(&self, path: &Path) -> Result<(), StorageError>;
    /// Makes the creations, renames and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> Result<(), StorageError>;
}

/// A storage shared by the threads of a node (real files by default); `Debug` for configs.
#[derive(Clone)]
pub struct SharedStorage(pub Arc<dyn Storage>);

impl Default for SharedStorage {
    fn default() -> Self {
        SharedStorage(Arc::new(MmapStorage))
    }
}

impl std::fmt::Debug for SharedStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedStorage")
    }
}

/// One open, fixed-size file.
pub trait StorageFile: Send + Sync {
    /// The path used in error messages.
    fn path(&self) -> &Path;
    /// Records that the file was renamed, so later errors name it correctly.
    fn set_path(&mut self, path: PathBuf);
    /// Size of the file in bytes (fixed at allocation).
    fn size(&self) -> u64;
    /// The whole file, borrowed without copying where the implementation allows.
    fn bytes(&self) -> &[u8];
    /// Copies `data` to `offset`. Not durable until `sync` covers it.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError>;
    /// Like `write` (same bytes, same durability once `sync` covers them), but for a mapped
    /// file through its descriptor (`pwrite(2)`) instead of through the mapping, so the pages
    /// are never dirtied through this process's page tables (see `wal::LogWrite`). Elsewhere
    /// the same as `write`.
    fn write_unmapped(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        self.write(offset, data)
    }
    /// Makes `[offset, offset + len)` durable. Must not return before it is.
    fn sync(&mut self, offset: u64, len: u64) -> Result<(), StorageError>;
    /// For a file just made by `Storage::allocate`: a job that writes its zeros out for real
    /// (see [`Prefill`]), to run on another thread before anything else writes the file. `None`
    /// where that buys nothing (the default: files in memory, the tests' fault injection).
    fn prefill(&self) -> Option<Prefill> {
        None
    }
}

/// Writes zeros over a file that `Storage::allocate` reserved, so that its blocks are *written*
/// on disk and not only reserved.
///
/// `posix_fallocate` on ext4 and XFS reserves "unwritten" extents: they read as zeros, but the
/// first write into one must also change the extent map, so the `fdatasync`/`msync` that makes
/// that write durable commits a journal transaction besides flushing the data. Measured on this
/// project's VM (write + `fdatasync` of 32 KiB, two files at once, as two shards sync):
/// p50 442-469 us into reserved blocks, 265-268 us into zeroed ones (docs/benchmarks.md,
/// "Session 10"). The log zero-fills its spare segment on a helper thread while it fills the
/// active one, so its syncs overwrite written blocks.
///
/// Nothing depends on it for correctness: a file not (or half) prefilled still reads as zeros
/// and its syncs are as durable, only slower. The zeroed pages stay in the page cache (a write
/// that covers part of a page not in the cache would otherwise read the block from disk first).
pub struct Prefill {
    file: File,
    path: PathBuf,
    len: u64,
}

impl Prefill {
    /// Bytes written and written back at a time.
    pub const CHUNK: u64 = 256 << 10;
    /// The most bytes a second it writes. Every sync of the log flushes the device's cache,
    /// zeros included: written as fast as the disk takes them (1 MiB chunks, unpaced), the
    /// zeros made the log's syncs wait behind them, and the engine's acknowledgement p99 at a
    /// steady 250 000 tips/s went from 2.8-4.9 ms to 8.7-12.1 ms (docs/benchmarks.md, session
    /// 10). At this rate a 64 MiB segment takes a second; a log filling it faster gets it partly
    /// zero-filled.
    pub const BYTES_PER_SEC: u64 = 64 << 20;

    /// Zeros the file chunk by chunk at `BYTES_PER_SEC`, each chunk written back before the
    /// next, then syncs it (making the extent changes durable off the log's path). Stops
    /// between chunks once `stop` is set: the caller is about to write the file itself (and
    /// unparks this thread, so a pause ends at once).
    pub fn run(&self, stop: &AtomicBool) -> Result<(), StorageError> {
        use std::os::unix::fs::FileExt;
        let zeros = vec![0u8; Self::CHUNK as usize];
        let start = std::time::Instant::now();
        let mut offset = 0;
        while offset < self.len {
            // Pace: chunk k starts no earlier than k chunks' worth of time after the first.
            let due = start + std::time::Duration::from_secs_f64(offset as f64 / Self::BYTES_PER_SEC as f64);
            loop {
                if stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                let now = std::time::Instant::now();
                if now >= due {
                    break;
                }
                std::thread::park_timeout(due - now);
            }
            let n = Self::CHUNK.min(self.len - offset);
            self.file
                .write_all_at(&zeros[..n as usize], offset)
                .map_err(|e| io_err("pwrite (prefill)", &self.path, e))?;
            #[cfg(target_os = "linux")]
            {
                let flags =
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
                // SAFETY: plain syscall on a valid, owned descriptor; offsets within the file.
                let rc = unsafe { libc::sync_file_range(self.file.as_raw_fd(), offset as i64, n as i64, flags) };
                if rc != 0 {
                    return Err(io_err("sync_file_range (prefill)", &self.path, io::Error::last_os_error()));
                }
            }
            offset += n;
        }
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| io_err("fdatasync (prefill)", &self.path, e))
    }

    /// The file being zeroed (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub(crate) fn io_err(op: &'static str, path: &Path, source: io::Error) -> StorageError {
    StorageError::Io { op, path: path.to_path_buf(), source }
}

/// Checks `[offset, offset + len)` lies within a file of `size` bytes; returns the range as usize.
fn checked_range(path: &Path, offset: u64, len: u64, size: u64) -> Result<std::ops::Range<usize>, StorageError> {
    let oob = || StorageError::OutOfBounds { path: path.to_path_buf(), offset, len, file_len: size };
    let end = offset.checked_add(len).ok_or_else(oob)?;
    if end > size {
        return Err(oob());
    }
    let start = usize::try_from(offset).map_err(|_| oob())?;
    let end = usize::try_from(end).map_err(|_| oob())?;
    Ok(start..end)
}

/// `fsync` of a directory, so that entries created, renamed or removed in it survive power loss.
pub fn sync_dir_path(dir: &Path) -> Result<(), StorageError> {
    let d = File::open(dir).map_err(|e| io_err("open directory", dir, e))?;
    d.sync_all().map_err(|e| io_err("fsync directory", dir, e))
}

/// `create_dir_all` whose new directories survive power loss: a directory's entry is in its
/// parent, durable only once the parent is synced, so the parent of each directory created here
/// is synced, outermost first. Directories that existed are left as they are.
pub fn create_dir_durably(dir: &Path) -> Result<(), StorageError> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.exists()).collect();
    fs::create_dir_all(dir).map_err(|e| io_err("create directory", dir, e))?;
    for created in missing.iter().rev() {
        let parent = created.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        sync_dir_path(parent)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Real files.

/// Real files: `posix_fallocate` + `mmap`, durability by `msync(MS_SYNC)`.
///
/// Assumes no other process truncates or writes the files while they are mapped (the
/// [`DirLock`] keeps other stormledger processes out); a truncation behind our back would turn
/// loads from the mapping into SIGBUS.
#[derive(Clone, Copy, Debug, Default)]
pub struct MmapStorage;

enum Map {
    ReadWrite(MmapMut),
    ReadOnly(Mmap),
    /// `mmap` of zero bytes is invalid; an empty file has nothing to map.
    Empty,
}

struct MmapFile {
    path: PathBuf,
    // Kept open for the lifetime of the mapping: `write_unmapped` writes through it.
    file: File,
    map: Map,
}

impl Storage for MmapStorage {
    fn create_dir_all(&self, dir: &Path) -> Result<(), StorageError> {
        create_dir_durably(dir)
    }

    fn write_file(&self, path: &Path, chunks: &[&[u8]]) -> Result<(), StorageError> {
        let file = OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| io_err("create", path, e))?;
        let mut out = io::BufWriter::with_capacity(1 << 20, file);
        for chunk in chunks {
            out.write_all(chunk).map_err(|e| io_err("write", path, e))?;
        }
        let file = out.into_inner().map_err(|e| io_err("write", path, e.into_error()))?;
        file.sync_all().map_err(|e| io_err("fsync", path, e))
    }

    fn list(&self, dir: &Path) -> Result<Vec<String>, StorageError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| io_err("read directory", dir, e))? {
            let entry = entry.map_err(|e| io_err("read directory", dir, e))?;
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn allocate(&self, path: &Path, len: u64) -> Result<Box<dyn StorageFile>, StorageError> {
        let alloc_err = |source| StorageError::Allocate { path: path.to_path_buf(), len, source };
        let off_len = libc::off_t::try_from(len)
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| alloc_err(io::Error::from_raw_os_error(libc::EFBIG)))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| io_err("create", path, e))?;
        // SAFETY: plain syscall on a valid, owned descriptor.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, off_len) };
        if rc != 0 {
            // Leave no half-allocated file behind: it would look like a short segment.
            drop(file);
            let _ = fs::remove_file(path);
            return Err(alloc_err(io::Error::from_raw_os_error(rc)));
        }
        // Make the size and the allocated extents durable now, so later syncs of data ranges
        // never depend on metadata the range sync might not cover.
        file.sync_all().map_err(|e| io_err("fsync", path, e))?;
        // SAFETY: the file is ours (created with create_new under the directory lock) and is
        // never truncated while mapped.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(|e| io_err("mmap", path, e))?;
        Ok(Box::new(MmapFile { path: path.to_path_buf(), file, map: Map::ReadWrite(map) }))
    }

    fn open(&self, path: &Path, mode: OpenMode) -> Result<Box<dyn StorageFile>, StorageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(mode == OpenMode::ReadWrite)
            .open(path)
            .map_err(|e| io_err("open", path, e))?;
        let len = file.metadata().map_err(|e| io_err("stat", path, e))?.len();
        let map = if len == 0 {
            Map::Empty
        } else {
            match mode {
                // SAFETY: see `allocate`; read-only maps are never written through.
                OpenMode::ReadOnly => Map::ReadOnly(unsafe { Mmap::map(&file) }.map_err(|e| io_err("mmap", path, e))?),
                // SAFETY: see `allocate`.
                OpenMode::ReadWrite => {
                    Map::ReadWrite(unsafe { MmapMut::map_mut(&file) }.map_err(|e| io_err("mmap", path, e))?)
                }
            }
        };
        Ok(Box::new(MmapFile { path: path.to_path_buf(), file, map }))
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<(), StorageError> {
        fs::rename(from, to).map_err(|e| io_err("rename", from, e))
    }

    fn remove(&self, path: &Path) -> Result<(), StorageError> {
        fs::remove_file(path).map_err(|e| io_err("remove", path, e))
    }

    fn sync_dir(&self, dir: &Path) -> Result<(), StorageError> {
        sync_dir_path(dir)
    }
}

impl StorageFile for MmapFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn set_path(&mut self, path: PathBuf) {
        self.path = path;
    }

    fn size(&self) -> u64 {
        self.bytes().len() as u64
    }

    fn bytes(&self) -> &[u8] {
        match &self.map {
            Map::ReadWrite(m) => m,
            Map::ReadOnly(m) => m,
            Map::Empty => &[],
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        let size = self.size();
        let range = checked_range(&self.path, offset, data.len() as u64, size)?;
        match &mut self.map {
            Map::ReadWrite(m) => {
                m.get_mut(range)
                    .ok_or_else(|| StorageError::OutOfBounds {
                        path: self.path.clone(),
                        offset,
                        len: data.len() as u64,
                        file_len: size,
                    })?
                    .copy_from_slice(data);
                Ok(())
            }
            Map::ReadOnly(_) | Map::Empty => Err(StorageError::ReadOnly { path: self.path.clone() }),
        }
    }

    fn write_unmapped(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        use std::os::unix::fs::FileExt;
        checked_range(&self.path, offset, data.len() as u64, self.size())?;
        match &self.map {
            // The same page cache pages the mapping shows: `bytes()` sees the data at once, and
            // the msync of `sync` writes them back (msync of a shared file mapping syncs the
            // file's range, however its pages were dirtied).
            Map::ReadWrite(_) => self.file.write_all_at(data, offset).map_err(|e| io_err("pwrite", &self.path, e)),
            Map::ReadOnly(_) | Map::Empty => Err(StorageError::ReadOnly { path: self.path.clone() }),
        }
    }

    fn sync(&mut self, offset: u64, len: u64) -> Result<(), StorageError> {
        let range = checked_range(&self.path, offset, len, self.size())?;
        match &self.map {
            // msync(MS_SYNC): waits for write-back of the range. Not MS_ASYNC (`flush_async`),
            // which only schedules it and proves nothing.
            Map::ReadWrite(m) => m.flush_range(range.start, range.len()).map_err(|e| io_err("msync", &self.path, e)),
            Map::ReadOnly(_) | Map::Empty => Err(StorageError::ReadOnly { path: self.path.clone() }),
        }
    }

    fn prefill(&self) -> Option<Prefill> {
        match &self.map {
            Map::ReadWrite(_) => {
                self.file.try_clone().ok().map(|file| Prefill { file, path: self.path.clone(), len: self.size() })
            }
            Map::ReadOnly(_) | Map::Empty => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fault injection.

/// Counters shared by a [`FaultyStorage`] and the files it opened.
#[derive(Default, Debug)]
struct FaultPlan {
    // Countdown per operation: 0 = disarmed; n = the n-th next operation fails (once).
    write_countdown: AtomicU64,
    sync_countdown: AtomicU64,
    alloc_countdown: AtomicU64,
    writes: AtomicU64,
    syncs: AtomicU64,
    allocations: AtomicU64,
}

impl FaultPlan {
    /// Counts one operation; true if it must fail.
    fn trip(counter: &AtomicU64, countdown: &AtomicU64) -> bool {
        counter.fetch_add(1, Ordering::Relaxed);
        countdown
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n > 0).then(|| n - 1))
            .is_ok_and(|previous| previous == 1)
    }
}

/// Numbers of operations seen by a [`FaultyStorage`] so far (failed ones included).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct OpCounts {
    pub writes: u64,
    /// File syncs and directory syncs.
    pub syncs: u64,
    pub allocations: u64,
}

/// Wraps a storage and fails the Nth write, sync (file or directory) or allocation with an
/// injected OS error (`EIO`, or `ENOSPC` for allocations). Each armed fault fires once.
#[derive(Clone)]
pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    plan: Arc<FaultPlan>,
}

impl FaultyStorage {
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        Self { inner, plan: Arc::default() }
    }

    /// The `n`-th write from now (1 = the next one) fails with `EIO`. 0 disarms.
    pub fn fail_nth_write(&self, n: u64) {
        self.plan.write_countdown.store(n, Ordering::Relaxed);
    }

    /// The `n`-th file or directory sync from now fails with `EIO`. 0 disarms.
    pub fn fail_nth_sync(&self, n: u64) {
        self.plan.sync_countdown.store(n, Ordering::Relaxed);
    }

    /// The `n`-th allocation from now fails with `ENOSPC` (a full disk). 0 disarms.
    pub fn fail_nth_allocation(&self, n: u64) {
        self.plan.alloc_countdown.store(n, Ordering::Relaxed);
    }

    pub fn counts(&self) -> OpCounts {
        OpCounts {
            writes: self.plan.writes.load(Ordering::Relaxed),
            syncs: self.plan.syncs.load(Ordering::Relaxed),
            allocations: self.plan.allocations.load(Ordering::Relaxed),
        }
    }
}

fn injected(op: &'static str, path: &Path, errno: i32) -> StorageError {
    io_err(op, path, io::Error::from_raw_os_error(errno))
}

impl Storage for FaultyStorage {
    fn create_dir_all(&self, dir: &Path) -> Result<(), StorageError> {
        self.inner.create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> Result<Vec<String>, StorageError> {
        self.inner.list(dir)
    }

    fn allocate(&self, path: &Path, len: u64) -> Result<Box<dyn StorageFile>, StorageError> {
        if FaultPlan::trip(&self.plan.allocations, &self.plan.alloc_countdown) {
            return Err(StorageError::Allocate {
                path: path.to_path_buf(),
                len,
                source: io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        let inner = self.inner.allocate(path, len)?;
        Ok(Box::new(FaultyFile { inner, plan: Arc::clone(&self.plan) }))
    }

    fn open(&self, path: &Path, mode: OpenMode) -> Result<Box<dyn StorageFile>, StorageError> {
        let inner = self.inner.open(path, mode)?;
        Ok(Box::new(FaultyFile { inner, plan: Arc::clone(&self.plan) }))
    }

    fn write_file(&self, path: &Path, chunks: &[&[u8]]) -> Result<(), StorageError> {
        if FaultPlan::trip(&self.plan.writes, &self.plan.write_countdown) {
            return Err(injected("write", path, libc::EIO));
        }
        if FaultPlan::trip(&self.plan.syncs, &self.plan.sync_countdown) {
            return Err(injected("fsync", path, libc::EIO));
        }
        self.inner.write_file(path, chunks)
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<(), StorageError> {
        self.inner.rename(from, to)
    }

    fn remove(&self, path: &Path) -> Result<(), StorageError> {
        self.inner.remove(path)
    }

    fn sync_dir(&self, dir: &Path) -> Result<(), StorageError> {
        if FaultPlan::trip(&self.plan.syncs, &self.plan.sync_countdown) {
            return Err(injected("fsync directory", dir, libc::EIO));
        }
        self.inner.sync_dir(dir)
    }
}

struct FaultyFile {
    inner: Box<dyn StorageFile>,
    plan: Arc<FaultPlan>,
}

impl StorageFile for FaultyFile {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn set_path(&mut self, path: PathBuf) {
        self.inner.set_path(path);
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn bytes(&self) -> &[u8] {
        self.inner.bytes()
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        if FaultPlan::trip(&self.plan.writes, &self.plan.write_countdown) {
            return Err(injected("write", self.inner.path(), libc::EIO));
        }
        self.inner.write(offset, data)
    }

    fn write_unmapped(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        if FaultPlan::trip(&self.plan.writes, &self.plan.write_countdown) {
            return Err(injected("pwrite", self.inner.path(), libc::EIO));
        }
        self.inner.write_unmapped(offset, data)
    }

    fn sync(&mut self, offset: u64, len: u64) -> Result<(), StorageError> {
        if FaultPlan::trip(&self.plan.syncs, &self.plan.sync_countdown) {
            return Err(injected("msync", self.inner.path(), libc::EIO));
        }
        self.inner.sync(offset, len)
    }
}

// ---------------------------------------------------------------------------------------------
// In-memory crash image.

/// What survives a simulated crash of a [`MemStorage`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Crash {
    /// `kill -9` of the process: the kernel keeps every write and every directory change, and
    /// what was not durable stays not durable (a later `PowerLoss` of the image loses it).
    ProcessKill,
    /// Power loss: only synced bytes and directory entries made durable by `sync_dir` survive.
    PowerLoss,
    /// Power loss while the unsynced writes were being written back in issue order: the first
    /// `keep_bytes` bytes of them (counted across writes) reached the disk, the rest did not.
    TornWrite { keep_bytes: u64 },
}

#[derive(Default)]
struct Inode {
    live: Vec<u8>,
    durable: Vec<u8>,
}

struct PendingWrite {
    inode: u64,
    offset: usize,
    data: Vec<u8>,
}

#[derive(Default)]
struct MemState {
    next_inode: u64,
    live_names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    inodes: HashMap<u64, Inode>,
    /// Writes not yet covered by a sync, in issue order (for `Crash::TornWrite`).
    pending: Vec<PendingWrite>,
}

/// An in-memory crash image: live bytes and durable bytes kept apart, per file and per
/// directory entry. Clones share the same image.
///
/// A handle sees the file as it was when opened plus its own writes (each handle keeps its own
/// copy so it can lend `&[u8]`); the log opens a file for writing only after all readers of it
/// are done, so this never shows.
#[derive(Clone, Default)]
pub struct MemStorage {
    state: Arc<Mutex<MemState>>,
}

impl MemStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new, independent image holding what survives `crash` of this one.
    pub fn crash(&self, crash: Crash) -> MemStorage {
        let st = self.state.lock();
        if crash == Crash::ProcessKill {
            // The kernel outlives the process: the page cache and the directory entries stay as
            // they are, durable or not, and so do the writes still waiting for a sync.
            let inodes = st
                .inodes
                .iter()
                .map(|(&ino, inode)| (ino, Inode { live: inode.live.clone(), durable: inode.durable.clone() }))
                .collect();
            let pending = st
                .pending
                .iter()
                .map(|w| PendingWrite { inode: w.inode, offset: w.offset, data: w.data.clone() })
                .collect();
            let state = MemState {
                next_inode: st.next_inode,
                live_names: st.live_names.clone(),
                durable_names: st.durable_names.clone(),
                inodes,
                pending,
            };
            return MemStorage { state: Arc::new(Mutex::new(state)) };
        }
        let mut inodes: HashMap<u64, Inode> = HashMap::new();
        for (&ino, inode) in &st.inodes {
            let bytes = inode.durable.clone();
            inodes.insert(ino, Inode { live: bytes.clone(), durable: bytes });
        }
        if let Crash::TornWrite { keep_bytes } = crash {
            let mut budget = usize::try_from(keep_bytes).unwrap_or(usize::MAX);
            for w in &st.pending {
                if budget == 0 {
                    break;
                }
                let n = w.data.len().min(budget);
                budget -= n;
                if let Some(inode) = inodes.get_mut(&w.inode) {
                    let (src, end) = (&w.data[..n], w.offset + n);
                    inode.live[w.offset..end].copy_from_slice(src);
                    inode.durable[w.offset..end].copy_from_slice(src);
                }
            }
        }
        let names = st.durable_names.clone();
        let state = MemState {
            next_inode: st.next_inode,
            live_names: names.clone(),
            durable_names: names,
            inodes,
            pending: Vec::new(),
        };
        MemStorage { state: Arc::new(Mutex::new(state)) }
    }

    /// Live bytes of `path`, if it exists.
    pub fn read_live(&self, path: &Path) -> Option<Vec<u8>> {
        let st = self.state.lock();
        st.live_names.get(path).and_then(|ino| st.inodes.get(ino)).map(|i| i.live.clone())
    }

    /// Overwrites bytes in both the live and durable image, bypassing the write path: media
    /// corruption or an operator's hex editor. Panics if the range is outside the file.
    pub fn corrupt(&self, path: &Path, offset: usize, data: &[u8]) {
        let mut st = self.state.lock();
        let ino = *st.live_names.get(path).expect("corrupt: no such file");
        let inode = st.inodes.get_mut(&ino).expect("inode");
        inode.live[offset..offset + data.len()].copy_from_slice(data);
        inode.durable[offset..offset + data.len()].copy_from_slice(data);
    }

    /// Removes `path` from both the live and durable directory (an operator deleting a file).
    pub fn delete(&self, path: &Path) {
        let mut st = self.state.lock();
        st.live_names.remove(path);
        st.durable_names.remove(path);
    }
}

fn not_found(op: &'static str, path: &Path) -> StorageError {
    io_err(op, path, io::Error::from(io::ErrorKind::NotFound))
}

impl Storage for MemStorage {
    fn create_dir_all(&self, _dir: &Path) -> Result<(), StorageError> {
        // Directories exist implicitly: a name's parent is its directory.
        Ok(())
    }

    fn list(&self, dir: &Path) -> Result<Vec<String>, StorageError> {
        let st = self.state.lock();
        Ok(st
            .live_names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
            .collect())
    }

    fn allocate(&self, path: &Path, len: u64) -> Result<Box<dyn StorageFile>, StorageError> {
        let size = usize::try_from(len).map_err(|_| StorageError::Allocate {
            path: path.to_path_buf(),
            len,
            source: io::Error::from_raw_os_error(libc::EFBIG),
        })?;
        let mut st = self.state.lock();
        if st.live_names.contains_key(path) {
            return Err(io_err("create", path, io::Error::from(io::ErrorKind::AlreadyExists)));
        }
        let ino = st.next_inode;
        st.next_inode += 1;
        // Allocation is durable at once (the real storage fsyncs the new file); the name is not.
        st.inodes.insert(ino, Inode { live: vec![0; size], durable: vec![0; size] });
        st.live_names.insert(path.to_path_buf(), ino);
        Ok(Box::new(MemFile {
            state: Arc::clone(&self.state),
            inode: ino,
            path: path.to_path_buf(),
            data: vec![0; size],
            writable: true,
        }))
    }

    fn open(&self, path: &Path, mode: OpenMode) -> Result<Box<dyn StorageFile>, StorageError> {
        let st = self.state.lock();
        let ino = *st.live_names.get(path).ok_or_else(|| not_found("open", path))?;
        let data = st.inodes.get(&ino).map(|i| i.live.clone()).unwrap_or_default();
        Ok(Box::new(MemFile {
            state: Arc::clone(&self.state),
            inode: ino,
            path: path.to_path_buf(),
            data,
            writable: mode == OpenMode::ReadWrite,
        }))
    }

    fn write_file(&self, path: &Path, chunks: &[&[u8]]) -> Result<(), StorageError> {
        let bytes = chunks.concat();
        let mut st = self.state.lock();
        if st.live_names.contains_key(path) {
            return Err(io_err("create", path, io::Error::from(io::ErrorKind::AlreadyExists)));
        }
        let ino = st.next_inode;
        st.next_inode += 1;
        // The contents are durable at once (the real storage fsyncs the file); the name is not.
        st.inodes.insert(ino, Inode { live: bytes.clone(), durable: bytes });
        st.live_names.insert(path.to_path_buf(), ino);
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<(), StorageError> {
        let mut st = self.state.lock();
        let ino = st.live_names.remove(from).ok_or_else(|| not_found("rename", from))?;
        st.live_names.insert(to.to_path_buf(), ino);
        Ok(())
    }

    fn remove(&self, path: &Path) -> Result<(), StorageError> {
        let mut st = self.state.lock();
        st.live_names.remove(path).map(|_| ()).ok_or_else(|| not_found("remove", path))
    }

    fn sync_dir(&self, dir: &Path) -> Result<(), StorageError> {
        let mut st = self.state.lock();
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        st.durable_names.retain(|p, _| !in_dir(p));
        let live: Vec<(PathBuf, u64)> =
            st.live_names.iter().filter(|(p, _)| in_dir(p)).map(|(p, &i)| (p.clone(), i)).collect();
        st.durable_names.extend(live);
        Ok(())
    }
}

struct MemFile {
    state: Arc<Mutex<MemState>>,
    inode: u64,
    path: PathBuf,
    data: Vec<u8>,
    writable: bool,
}

impl StorageFile for MemFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn set_path(&mut self, path: PathBuf) {
        self.path = path;
    }

    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn bytes(&self) -> &[u8] {
        &self.data
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        if !self.writable {
            return Err(StorageError::ReadOnly { path: self.path.clone() });
        }
        let range = checked_range(&self.path, offset, data.len() as u64, self.size())?;
        self.data[range.clone()].copy_from_slice(data);
        let mut st = self.state.lock();
        if let Some(inode) = st.inodes.get_mut(&self.inode) {
            inode.live[range.clone()].copy_from_slice(data);
        }
        st.pending.push(PendingWrite { inode: self.inode, offset: range.start, data: data.to_vec() });
        Ok(())
    }

    fn sync(&mut self, offset: u64, len: u64) -> Result<(), StorageError> {
        if !self.writable {
            return Err(StorageError::ReadOnly { path: self.path.clone() });
        }
        let range = checked_range(&self.path, offset, len, self.size())?;
        let mut st = self.state.lock();
        if let Some(inode) = st.inodes.get_mut(&self.inode) {
            let Inode { live, durable } = inode;
            durable[range.clone()].copy_from_slice(&live[range.clone()]);
        }
        let ino = self.inode;
        st.pending.retain(|w| !(w.inode == ino && w.offset >= range.start && w.offset + w.data.len() <= range.end));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Data-directory lock.

/// Exclusive lock on a data directory: `flock(LOCK_EX | LOCK_NB)` on `DIR/LOCK`, held until
/// dropped. The kernel releases it when the process dies, so a crashed server never leaves a
/// stale lock behind. The file holds the owner's pid for operators; its content is not trusted.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    pub const FILE_NAME: &'static str = "LOCK";

    /// Takes the lock, creating `dir` and the lock file if needed. A second acquirer (another
    /// process, or another `DirLock` in this one) gets `StorageError::AlreadyLocked`.
    pub fn acquire(dir: &Path) -> Result<DirLock, StorageError> {
        fs::create_dir_all(dir).map_err(|e| io_err("create directory", dir, e))?;
        let path = dir.join(Self::FILE_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_err("open", &path, e))?;
        flock(&file, &path, libc::LOCK_EX)?;
        // Best effort: the pid is a hint for operators, the flock is the lock.
        let _ = file.set_len(0).and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(DirLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// For a reader of the directory (`stormledger-recover verify`, `inspect`, `replay`,
    /// `recover --dry-run`): a shared lock, held until dropped, so no server runs on the
    /// directory meanwhile (its files would change under the reader's mappings). Writes
    /// nothing: `None` if the directory has no lock file (no server ever ran there).
    /// `AlreadyLocked` while a server holds it.
    pub fn shared(dir: &Path) -> Result<Option<File>, StorageError> {
        let path = dir.join(Self::FILE_NAME);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", &path, e)),
        };
        flock(&file, &path, libc::LOCK_SH)?;
        Ok(Some(file))
    }
}

/// `flock(operation | LOCK_NB)` of `file` (the lock file at `path`): `AlreadyLocked` if another
/// holder's lock conflicts.
fn flock(file: &File, path: &Path, operation: libc::c_int) -> Result<(), StorageError> {
    // SAFETY: plain syscall on a valid, owned descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), operation | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            StorageError::AlreadyLocked { path: path.to_path_buf() }
        } else {
            io_err("flock", path, e)
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_crash_keeps_only_synced_bytes_and_names() {
        let mem = MemStorage::new();
        let dir = Path::new("/d");
        let p = dir.join("a");
        let mut f = mem.allocate(&p, 16).unwrap();
        f.write(0, b"abcd").unwrap();
        f.sync(0, 4).unwrap();
        f.write(4, b"efgh").unwrap();
        // Name not durable yet.
        assert!(mem.crash(Crash::PowerLoss).read_live(&p).is_none());
        mem.sync_dir(dir).unwrap();
        let after = mem.crash(Crash::PowerLoss).read_live(&p).unwrap();
        assert_eq!(&after[..8], b"abcd\0\0\0\0");
        let torn = mem.crash(Crash::TornWrite { keep_bytes: 2 }).read_live(&p).unwrap();
        assert_eq!(&torn[..8], b"abcdef\0\0");
        let killed = mem.crash(Crash::ProcessKill).read_live(&p).unwrap();
        assert_eq!(&killed[..8], b"abcdefgh");
        // A kill keeps the page cache, not durability: a power loss after it loses the same.
        let killed_then_lost = mem.crash(Crash::ProcessKill).crash(Crash::PowerLoss).read_live(&p).unwrap();
        assert_eq!(&killed_then_lost[..8], b"abcd\0\0\0\0");
        let name = dir.join("b");
        mem.allocate(&name, 4).unwrap();
        assert!(mem.crash(Crash::ProcessKill).read_live(&name).is_some());
        assert!(mem.crash(Crash::ProcessKill).crash(Crash::PowerLoss).read_live(&name).is_none());
    }

    #[test]
    fn faulty_countdown_fires_once() {
        let faulty = FaultyStorage::new(Arc::new(MemStorage::new()));
        let mut f = faulty.allocate(Path::new("/d/x"), 8).unwrap();
        faulty.fail_nth_write(2);
        f.write(0, b"a").unwrap();
        assert!(f.write(0, b"a").is_err());
        f.write(0, b"a").unwrap();
        assert_eq!(faulty.counts().writes, 3);
    }

    #[test]
    fn dir_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let lock = DirLock::acquire(dir.path()).unwrap();
        match DirLock::acquire(dir.path()) {
            Err(StorageError::AlreadyLocked { path }) => assert_eq!(path, lock.path()),
            other => panic!("expected AlreadyLocked, got {other:?}"),
        }
        drop(lock);
        DirLock::acquire(dir.path()).unwrap();
    }
}
