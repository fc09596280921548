//! `stormledger-storm`: the gift-storm load generator and end-to-end checker.
//! See `tools/src/storm/mod.rs` and the "Gift-storm tool" section of the operator contract.
#![recursion_limit = "256"]

#[path = "../storm/mod.rs"]
mod storm;

fn main() {
    stormledger::tune_allocator();
    std::process::exit(storm::main());
}
