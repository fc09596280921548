//! The machine's floor for a request/answer over TCP loopback, without stormledger: two threads
//! of one process, blocking std sockets with TCP_NODELAY, 32-byte request, 32-byte answer (a
//! balance query and its answer are 72 and 72 bytes). What a balance read over TCP can never beat
//! on this machine; `docs/benchmarks.md` compares the server's read latency with it.
//! `cargo bench --bench loopback`. Environment: BENCH_PINGS [20000] per pause.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

mod common;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let pings = common::size("BENCH_PINGS", 20_000, 200);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        socket.set_nodelay(true).unwrap();
        let mut buf = [0u8; 32];
        while socket.read_exact(&mut buf).is_ok() {
            socket.write_all(&buf).unwrap();
        }
    });
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_nodelay(true).unwrap();
    // Back to back (both threads stay warm), then with a pause between pings as a paced reader
    // has (the threads sleep and must be woken, like the storm tool's read probe).
    for pause in [Duration::ZERO, Duration::from_micros(100), Duration::from_millis(1)] {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).unwrap();
        let mut buf = [7u8; 32];
        for _ in 0..pings {
            let start = Instant::now();
            client.write_all(&buf).unwrap();
            client.read_exact(&mut buf).unwrap();
            hist.record(start.elapsed().as_nanos().max(1) as u64).unwrap();
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
        let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "loopback ping, pause {:>6?}: {pings} pings, p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us",
            pause,
            us(0.5),
            us(0.99),
            us(0.999),
            hist.max() as f64 / 1000.0
        );
    }
    drop(client);
    echo.join().unwrap();
}
