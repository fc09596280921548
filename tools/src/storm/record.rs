//! `--record FILE`: one line per command sent (`sent ID KIND FROM TO AMOUNT`) and per reply
//! received (`ack ID STATUS`), buffered and flushed by a background thread every 50 ms, so a
//! `kill -9` of the server (or of this tool) leaves a record at most ~50 ms behind.
//!
//! Amounts are in the command's unit: coins for tips and gifts (a gift's amount is its price
//! times its count, the coins it moves), fen for top-ups; `-` where a field does not apply.
//! Account creation is recorded with the account id as ID, method binding with the user's (its
//! reply is labelled with the method id, which is not unique). A top-up's begin and confirm share
//! its id, but the setup sends a confirm only once the phase of its begin was answered in full,
//! so each `ack` line belongs to the last `sent` line of its id.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stormledger::layout::ReplyRecord;
use stormledger::ledger::{Command, Status};

pub struct Recorder {
    out: Arc<Mutex<BufWriter<File>>>,
    stop: Arc<AtomicBool>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    pub fn create(path: &Path) -> std::io::Result<Recorder> {
        let out = Arc::new(Mutex::new(BufWriter::with_capacity(1 << 20, File::create(path)?)));
        let stop = Arc::new(AtomicBool::new(false));
        let flusher = {
            let (out, stop) = (out.clone(), stop.clone());
            std::thread::Builder::new().name("record-flush".into()).spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    let _ = out.lock().expect("record lock").flush();
                }
            })?
        };
        Ok(Recorder { out, stop, flusher: Some(flusher) })
    }

    /// Records commands about to be sent. `coins` gives a gift's price in coins.
    pub fn sent(&self, commands: &[Command], gift_price: impl Fn(u64) -> u64) {
        let mut out = self.out.lock().expect("record lock");
        for command in commands {
            let _ = match *command {
                Command::Tip { id, from, to, coins } => writeln!(out, "sent {id} tip {from} {to} {coins}"),
                Command::Gift { id, from, to, gift, count } => {
                    writeln!(out, "sent {id} gift {from} {to} {}", gift_price(gift) * count)
                }
                Command::TopUpBegin { id, user, fen, .. } => writeln!(out, "sent {id} topup_begin {user} - {fen}"),
                Command::TopUpConfirm { id, fen, .. } => {
                    let user = id.wrapping_sub(stormledger::workload::TOPUP_BASE);
                    writeln!(out, "sent {id} topup_confirm - {user} {fen}")
                }
                Command::CreateAccount { account, kind, .. } => {
                    writeln!(out, "sent {account} create_{} - - -", kind.name())
                }
                // Under the user's id (its reply is labelled with the method's, which every
                // storm user shares): the storm binds one method a user.
                Command::BindMethod { user, .. } => writeln!(out, "sent {user} bind_method {user} - -"),
                _ => Ok(()),
            };
        }
    }

    /// Records the replies to `commands` (same order).
    pub fn acks(&self, commands: &[Command], replies: &[ReplyRecord]) {
        let mut out = self.out.lock().expect("record lock");
        for (command, reply) in commands.iter().zip(replies) {
            let status = Status::from_code(reply.status.get()).map(Status::name).unwrap_or("unknown");
            let id = match *command {
                Command::BindMethod { user, .. } => user,
                _ => command.reply_id(),
            };
            let _ = writeln!(out, "ack {id} {status}");
        }
    }

    /// Stops the flusher and flushes what is left.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(f) = self.flusher.take() {
            let _ = f.join();
        }
        let mut out = self.out.lock().expect("record lock");
        out.flush()?;
        out.get_ref().sync_data()
    }
}
