//! Shared by the benchmarks with their own `main`: sizes from the environment, and smoke mode.
//!
//! `cargo bench` runs a benchmark binary with `--bench`; `cargo test --benches` (CI) runs it
//! without. Then each benchmark runs once at a small size: that proves it still works end to end
//! (a setup the ledger refuses, say) without timing anything.

/// Whether this is a smoke run (`cargo test --benches`) rather than a measurement.
pub fn smoke() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

/// The `BENCH_*` variable `name` if set, else `full` (`small` in a smoke run).
pub fn size(name: &str, full: u64, small: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(if smoke() { small } else { full })
}
