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
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    let cli = match args::Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => return report_usage_error(&e, wants_json(&args)),
    };
    match &cli.command {
        args::Command::Serve(serve_args) => serve::main(&cli, serve_args),
        _ => client::main(&cli),
    }
}

/// Whether `--json` is among the arguments (before any `--`): how a usage error is reported.
pub fn wants_json(args: &[std::ffi::OsString]) -> bool {
    args.iter().skip(1).take_while(|a| *a != "--").any(|a| a == "--json")
}

/// Reports an argument error from clap and returns the exit status. `--help` and `--version`
/// print as clap does (exit 0). A usage error prints clap's text on stderr and, with `--json`,
/// also one JSON object on stdout (`{"status":"usage_error","error":...}`, as the CLI's own
/// usage errors), so a script reading JSON lines gets one here too; exit 2.
pub fn report_usage_error(e: &clap::Error, json: bool) -> i32 {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) || !json {
        let _ = e.print();
        return e.exit_code();
    }
    let text = e.to_string();
    eprint!("{text}");
    let first = text.lines().next().unwrap_or_default();
    let message = first.strip_prefix("error: ").unwrap_or(first);
    println!("{}", serde_json::json!({ "status": "usage_error", "error": message }));
    EXIT_USAGE
}
