fn main() {
    eprintln!("stormledger: not yet implemented");
    std::process::exit(2);
}
