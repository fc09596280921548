//! A shard's journal, run either inline on the worker or on a log thread of its own.
//!
//! On its own thread (journals that wait for the disk, `Journal::pipelined`), the worker hands
//! batch k+1 to the log and applies batch k while k+1 is written and synced: the disk's wait and
//! the shard's CPU overlap. Results come back in the order the batches went in. The worker still
//! applies a batch only after its own result says it is durable (`worker.rs`, "Pipelining").
//!
//! Owns: the journal (one thread uses it at a time: the log thread, or the worker inline).
//! Must never: reorder appends; answer a blocking request (`sync_all`) while an append is
//! outstanding, since its answer would be taken for the append's.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::layout::CommandRecord;
use crate::shard::worker::{Journal, JournalError};

/// The outcome of one appended batch, with its records buffer handed back for reuse.
pub struct Appended {
    pub result: Result<u64, JournalError>,
    /// How long the append (write + sync) took.
    pub elapsed: Duration,
    pub records: Vec<CommandRecord>,
}

enum Request {
    Append {
        timestamp: u64,
        records: Vec<CommandRecord>,
    },
    SyncAll,
    /// Answered by nobody: a failed retirement only leaves redundant files (the log thread
    /// reports it).
    RetireBefore(u64),
}

enum Response {
    Appended(Appended),
    Synced(Result<(), JournalError>),
}

/// Appends beyond this many outstanding are a worker bug (it keeps at most two: the batch being
/// applied and the one behind it).
const OUTSTANDING_MAX: usize = 2;

enum Mode {
    Inline {
        journal: Box<dyn Journal>,
        done: VecDeque<Appended>,
    },
    Thread {
        requests: Option<Sender<Request>>,
        responses: Receiver<Response>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
}

/// One shard's journal behind a submit / finish interface.
pub struct LogStage {
    mode: Mode,
    outstanding: usize,
    shard: u16,
}

impl LogStage {
    /// Runs `journal` on a thread named `log-<shard>` if it asks for one, inline otherwise.
    pub fn new(journal: Box<dyn Journal>, shard: u16) -> LogStage {
        let mode = if journal.pipelined() {
            let (requests, inbox) = bounded::<Request>(OUTSTANDING_MAX + 2);
            let (outbox, responses) = bounded::<Response>(OUTSTANDING_MAX + 2);
            let thread = std::thread::Builder::new()
                .name(format!("log-{shard}"))
                .spawn(move || serve(journal, inbox, outbox, shard))
                .expect("spawn log thread");
            Mode::Thread { requests: Some(requests), responses, thread: Some(thread) }
        } else {
            Mode::Inline { journal, done: VecDeque::new() }
        };
        LogStage { mode, outstanding: 0, shard }
    }

    /// Whether `submit` returns before the batch is durable (so the worker can apply the batch
    /// before it meanwhile).
    pub fn is_pipelined(&self) -> bool {
        matches!(self.mode, Mode::Thread { .. })
    }

    /// Starts appending one batch. Its result is the next `finish` but one per batch submitted
    /// before it and not yet finished.
    pub fn submit(&mut self, timestamp: u64, records: Vec<CommandRecord>) {
        assert!(self.outstanding < OUTSTANDING_MAX, "shard {}: too many batches in the log", self.shard);
        self.outstanding += 1;
        match &mut self.mode {
            Mode::Inline { journal, done } => {
                let started = Instant::now();
                let result = journal.append_batch(timestamp, &records);
                done.push_back(Appended { result, elapsed: started.elapsed(), records });
            }
            Mode::Thread { requests, .. } => {
                // If the log thread is gone (it panicked), `finish` reports it.
                if let Some(r) = requests.as_ref() {
                    let _ = r.send(Request::Append { timestamp, records });
                }
            }
        }
    }

    /// Waits for the oldest submitted batch's result.
    pub fn finish(&mut self) -> Appended {
        assert!(self.outstanding > 0, "shard {}: nothing submitted to the log", self.shard);
        self.outstanding -= 1;
        match &mut self.mode {
            Mode::Inline { done, .. } => done.pop_front().expect("an inline append is done when submitted"),
            Mode::Thread { responses, .. } => match responses.recv() {
                Ok(Response::Appended(appended)) => appended,
                Ok(Response::Synced(_)) => unreachable!("a sync answered while an append was outstanding"),
                Err(_) => Appended { result: Err(thread_gone()), elapsed: Duration::ZERO, records: Vec::new() },
            },
        }
    }

    /// Makes everything appended durable regardless of mode. Only with nothing outstanding.
    pub fn sync_all(&mut self) -> Result<(), JournalError> {
        assert_eq!(self.outstanding, 0, "shard {}: sync_all with a batch in the log", self.shard);
        match &mut self.mode {
            Mode::Inline { journal, .. } => journal.sync_all(),
            Mode::Thread { requests, responses, .. } => {
                if requests.as_ref().is_none_or(|r| r.send(Request::SyncAll).is_err()) {
                    return Err(thread_gone());
                }
                match responses.recv() {
                    Ok(Response::Synced(result)) => result,
                    Ok(Response::Appended(_)) => unreachable!("an append answered with none outstanding"),
                    Err(_) => Err(thread_gone()),
                }
            }
        }
    }

    /// Drops log segments wholly below `lsn` (see `Journal::retire_before`). On the log thread
    /// this is queued behind the outstanding appends and its failure is reported there.
    pub fn retire_before(&mut self, lsn: u64) -> Result<(), JournalError> {
        match &mut self.mode {
            Mode::Inline { journal, .. } => journal.retire_before(lsn),
            Mode::Thread { requests, .. } => {
                if let Some(r) = requests.as_ref() {
                    let _ = r.send(Request::RetireBefore(lsn));
                }
                Ok(())
            }
        }
    }
}

impl Drop for LogStage {
    fn drop(&mut self) {
        if let Mode::Thread { requests, thread, .. } = &mut self.mode {
            // Closing the request channel ends the thread once it has served what was queued.
            drop(requests.take());
            if let Some(thread) = thread.take() {
                let _ = thread.join();
            }
        }
    }
}

fn thread_gone() -> JournalError {
    "the shard's log thread stopped".into()
}

/// The log thread: serves requests in order until the worker drops its sender.
fn serve(mut journal: Box<dyn Journal>, inbox: Receiver<Request>, outbox: Sender<Response>, shard: u16) {
    for request in inbox {
        let response = match request {
            Request::Append { timestamp, records } => {
                let started = Instant::now();
                let result = journal.append_batch(timestamp, &records);
                Response::Appended(Appended { result, elapsed: started.elapsed(), records })
            }
            Request::SyncAll => Response::Synced(journal.sync_all()),
            Request::RetireBefore(lsn) => {
                if let Err(error) = journal.retire_before(lsn) {
                    eprintln!("shard {shard}: retiring log segments failed: {error}");
                }
                continue;
            }
        };
        if outbox.send(response).is_err() {
            return;
        }
    }
}
