//! The gift-storm tool.
//!
//! - `args`: the command line.
//! - `link`: one logical connection to the ledger (in-process engine or TCP client with
//!   reconnects), with the same async `submit` / `balances` for both.
//! - `model`: the tool's own record of every acknowledged command: expected balance deltas.
//! - `probe`: the read probe, one balance read per round trip on a thread of its own.
//! - `record`: the `--record FILE` writer (flushed in the background every 50 ms).
//! - `spawn`: starting and stopping `stormledger serve` for `--spawn`.
//! - `run`: setup through the real API, the storm (closed or open loop), in-doubt resolution,
//!   verification, and the report.

pub mod args;
pub mod link;
pub mod model;
pub mod probe;
pub mod record;
pub mod run;
pub mod spawn;

/// Runs the tool; returns the process exit status.
pub fn main() -> i32 {
    use clap::Parser;
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args::Args::try_parse_from(&argv) {
        Ok(args) => run::main(args),
        Err(e) => stormledger::cli::report_usage_error(&e, stormledger::cli::wants_json(&argv)),
    }
}
