//! The `stormledger` binary: the server (`serve`) and the operator/client command line.
//!
//! `main.rs` only calls `run`. Here: `args` (the clap definition), `serve` (configuration
//! merging, data-directory lock, node, signals), `metrics` (the Prometheus endpoint), `client`
//! (one command per process: build, connect, send, print), `output` (JSON and human rendering)
//! and `token` (token files and the server lock). The operator contract is
//! `shared/INTERFACE.md`; operations are described in `docs/operations.md`.

pub mod args;
pub mod client;
pub mod metrics;
pub mod output;
pub mod serve;
pub mod token;

use clap::Parser;

/// Accepted, or a read succeeded.
pub const EXIT_OK: i32 = 0;
/// The ledger answered with a business rejection (the status is printed).
pub const EXIT_REJECTED: i32 = 1;
/// The server could not start or failed while running (`serve` only).
pub const EXIT_FAILURE: i32 = 1;
/// Usage error (bad flag, bad amount, unsupported command).
pub const EXIT_USAGE: i32 = 2;
/// The server could not be reached, authentication failed, or no definitive answer arrived.
pub const EXIT_UNREACHABLE: i32 = 3;

/// Parses `args` (including the program name) and runs the command; returns the exit status.
pub fn run<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match args::Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and exit 0; real errors exit 2.
            let _ = e.print();
            return e.exit_code();
        }
    };
    match &cli.command {
        args::Command::Serve(serve_args) => serve::main(&cli, serve_args),
        _ => client::main(&cli),
    }
}
