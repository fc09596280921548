//! `stormledger`: the server and the operator/client CLI. All logic is in `stormledger::cli`.

fn main() {
    stormledger::tune_allocator();
    std::process::exit(stormledger::cli::run(std::env::args_os()));
}
