//! A shard's journal, run either inline on the worker or, for a batch that has work queued
//! behind it, on a log thread of its own.
//!
//! With a journal that waits for the disk (`Journal::pipelined`), the worker hands batch k+1 to
//! the log thread and applies batch k while k+1 is written and synced: the disk's wait and the
//! shard's CPU overlap. When nothing is queued behind a batch there is nothing to overlap, and
//! the thread hand-off would only add its two wake-ups to the batch's latency, so the worker
//! appends it inline (`submit(.., inline: true)`). Results come back in the order the batches
//! went in. The worker still applies a batch only after its own result says it is durable
//! (`worker.rs`, "Pipelining").
//!
//! Owns: the journal, behind a mutex that the log thread holds during an append and the worker
//! takes for an inline append and `sync_all` (and for retirement when there is no log thread).
//! Must never: reorder appends (an inline append or `sync_all` only with nothing outstanding).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;

use crate::layout::CommandRecord;
use crate::shard::worker::{Journal, JournalError};

/// The outcome of one appended batch, with its records buffer handed back for reuse.
pub struct Appended {
    pub result: Result<u64, JournalError>,
    /// How long the append (write + sync) took.
    pub elapsed: Duration,
    /// Appended on the log thread (not inline).
    pub threaded: bool,
    pub records: Vec<CommandRecord>,
}

enum Request {
    Append {
        timestamp: u64,
        records: Vec<CommandRecord>,
    },
    /// Answered by nobody: a failed retirement only leaves redundant files (the log thread
    /// reports it).
    RetireBefore(u64),
}

/// Appends beyond this many outstanding are a worker bug (it keeps at most two: the batch being
/// applied and the one behind it).
const OUTSTANDING_MAX: usize = 2;

struct LogThread {
    requests: Option<Sender<Request>>,
    results: Receiver<Appended>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// One shard's journal behind a submit / finish interface.
pub struct LogStage {
    journal: Arc<Mutex<Box<dyn Journal>>>,
    thread: Option<LogThread>,
    /// The result of an inline append, not yet finished.
    done: Option<Appended>,
    outstanding: usize,
    shard: u16,
}

impl LogStage {
    /// Starts a thread named `log-<shard>` if `journal` asks for one.
    pub fn new(journal: Box<dyn Journal>, shard: u16) -> LogStage {
        let pipelined = journal.pipelined();
        let journal = Arc::new(Mutex::new(journal));
        let thread = pipelined.then(|| {
            let (requests, inbox) = bounded::<Request>(OUTSTANDING_MAX + 2);
            let (outbox, results) = bounded::<Appended>(OUTSTANDING_MAX);
            let journal = journal.clone();
            let thread = std::thread::Builder::new()
                .name(format!("log-{shard}"))
                .spawn(move || serve(&journal, inbox, outbox, shard))
                .expect("spawn log thread");
            LogThread { requests: Some(requests), results, thread: Some(thread) }
        });
        LogStage { journal, thread, done: None, outstanding: 0, shard }
    }

    /// Appends one batch: on the worker's thread if `inline` or there is no log thread (only
    /// with nothing outstanding), else on the log thread. Its result is the next `finish` but
    /// one per batch submitted before it and not yet finished. Returns whether it went to the
    /// log thread (so the worker can apply the batch before it meanwhile).
    pub fn submit(&mut self, timestamp: u64, records: Vec<CommandRecord>, inline: bool) -> bool {
        assert!(self.outstanding < OUTSTANDING_MAX, "shard {}: too many batches in the log", self.shard);
        self.outstanding += 1;
        match self.thread.as_ref().filter(|_| !inline) {
            Some(thread) => {
                // If the log thread is gone (it panicked), `finish` reports it.
                if let Some(requests) = thread.requests.as_ref() {
                    let _ = requests.send(Request::Append { timestamp, records });
                }
                true
            }
            None => {
                assert_eq!(self.outstanding, 1, "shard {}: an inline append behind another", self.shard);
                let started = Instant::now();
                let result = self.journal.lock().append_batch(timestamp, &records);
                self.done = Some(Appended { result, elapsed: started.elapsed(), threaded: false, records });
                false
            }
        }
    }

    /// Waits for the oldest submitted batch's result.
    pub fn finish(&mut self) -> Appended {
        assert!(self.outstanding > 0, "shard {}: nothing submitted to the log", self.shard);
        self.outstanding -= 1;
        // An inline append is only made with nothing outstanding, so it is the oldest.
        if let Some(appended) = self.done.take() {
            return appended;
        }
        let thread = self.thread.as_ref().expect("a threaded append has a log thread");
        thread.results.recv().unwrap_or_else(|_| Appended {
            result: Err("the shard's log thread stopped".into()),
            elapsed: Duration::ZERO,
            threaded: true,
            records: Vec::new(),
        })
    }

    /// Makes everything appended durable regardless of mode. Only with nothing outstanding.
    pub fn sync_all(&mut self) -> Result<(), JournalError> {
        assert_eq!(self.outstanding, 0, "shard {}: sync_all with a batch in the log", self.shard);
        self.journal.lock().sync_all()
    }

    /// Drops log segments wholly below `lsn` (see `Journal::retire_before`). With a log thread
    /// this is queued behind the outstanding appends and its failure is reported there.
    pub fn retire_before(&mut self, lsn: u64) -> Result<(), JournalError> {
        match self.thread.as_ref().and_then(|t| t.requests.as_ref()) {
            Some(requests) => {
                let _ = requests.send(Request::RetireBefore(lsn));
                Ok(())
            }
            None => self.journal.lock().retire_before(lsn),
        }
    }
}

impl Drop for LogStage {
    fn drop(&mut self) {
        if let Some(t) = self.thread.as_mut() {
            // Closing the request channel ends the thread once it has served what was queued.
            drop(t.requests.take());
            if let Some(thread) = t.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// The log thread: serves requests in order until the worker drops its sender.
fn serve(journal: &Mutex<Box<dyn Journal>>, inbox: Receiver<Request>, outbox: Sender<Appended>, shard: u16) {
    for request in inbox {
        match request {
            Request::Append { timestamp, records } => {
                let started = Instant::now();
                let result = journal.lock().append_batch(timestamp, &records);
                if outbox.send(Appended { result, elapsed: started.elapsed(), threaded: true, records }).is_err() {
                    return;
                }
            }
            Request::RetireBefore(lsn) => {
                if let Err(error) = journal.lock().retire_before(lsn) {
                    crate::log_line!("shard {shard}: retiring log segments failed: {error}");
                }
            }
        }
    }
}
