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
    let args = args::Args::parse();
    run::main(args)
}
