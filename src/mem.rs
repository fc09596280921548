//! Memory hints for the big per-shard tables.
//!
//! The shard's idempotency table and ring, its history ring and the id directory are tens to
//! hundreds of MiB each and are touched at random (or, for the rings, far apart). With 4 KiB
//! pages nearly every access is also a TLB miss, and under a hypervisor a TLB miss is a
//! two-level page walk. Asking for transparent huge pages (2 MiB) on these ranges removes most
//! of them: one shard's state machine went from 2.8 M to 4.2-5.3 M tips/s
//! (`cargo bench --bench state_machine`, docs/benchmarks.md).
//!
//! The account vector and the account index (ids and published balances) are advised too:
//! every tip probes the payer's index entry and touches its account and balance, at random,
//! and with 4 KiB pages those were TLB misses that the prefetches waited for (with 1 M users,
//! the fastest batch of one shard's tips took 163-208 ns a tip before, 140-154 ns after, five
//! runs each way; docs/benchmarks.md, session 5). A snapshot load, though, fills
//! them all at once at start-up, and with the hint the kernel compacts memory for every 2 MiB
//! page it hands out, which made loading 10 M accounts in a fresh process take 2.3 s instead
//! of 0.6 s. So a new shard advises them at once (`ShardState::new`), and a snapshot load
//! fills memory that is not advised and advises it afterwards: khugepaged collapses it in the
//! background, and accounts created later get huge pages directly.
//!
//! The hint changes no result: where THP is off (`/sys/kernel/mm/transparent_hugepage/enabled`
//! = `never`) or on other systems it does nothing.

/// Allocations below this size are not worth a hint (and may share pages with other data).
pub const HUGE_MIN_BYTES: usize = 4 << 20;

/// Asks the kernel to back `[ptr, ptr + bytes)` with transparent huge pages (best effort), if
/// the range is large enough to be worth it.
pub fn advise_huge(ptr: *const u8, bytes: usize) {
    if bytes >= HUGE_MIN_BYTES {
        advise_huge_any(ptr, bytes);
    }
}

/// `advise_huge` whatever the size. Only memory from `mmap` gets huge pages on this project's
/// kernel: heap memory (the `brk` heap and glibc's thread arenas) got none in a test, advised
/// or not (docs/benchmarks.md, session 10), so tables in many mid-sized parts take one mapping
/// (`IdTable::new_parts`).
pub fn advise_huge_any(ptr: *const u8, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = ptr as usize & !(PAGE - 1);
        let end = (ptr as usize + bytes).next_multiple_of(PAGE);
        // SAFETY: madvise with MADV_HUGEPAGE only changes how the kernel backs the pages of the
        // range (rounded out to whole pages, which may also hold neighbouring heap data); it
        // never changes their contents or validity. Errors are ignored: it is a hint.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

/// `Vec::with_capacity(capacity)` whose buffer is advised for huge pages.
pub fn huge_vec<T>(capacity: usize) -> Vec<T> {
    let v = Vec::with_capacity(capacity);
    advise_huge(v.as_ptr() as *const u8, capacity * core::mem::size_of::<T>());
    v
}

/// Advises the memory of `slice` for huge pages (call before first touching it).
pub fn advise_huge_slice<T>(slice: &[T]) {
    advise_huge(slice.as_ptr() as *const u8, core::mem::size_of_val(slice));
}
