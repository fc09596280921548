//! Encoding of one shard's `ShardState` into snapshot sections, and back.
//!
//! Accounts, the one section that grows with the user base, are encoded compactly (a shape byte
//! per account, then only its non-default fields as LEB128 varints; ids delta-coded in their own
//! section), see `docs/wal-format.md`. The other sections are fixed-size little-endian records.
//! Everything is written in a deterministic order (creation order for accounts, ring order for
//! ids and history, sorted keys for maps), and decoding accepts only the canonical encoding, so
//! the same state always gives the same bytes. Decoding checks every length and rebuilds the
//! derived indexes; the account index and then the payment methods' sorted arrays are filled on
//! a helper thread while the accounts are decoded.

use std::collections::VecDeque;

use crate::config::{LedgerConfig, ShardLimits};
use crate::layout::{CommandRecord, TEXT_LEN};
use crate::ledger::account::{Account, HistoryEntry, HistoryRing};
use crate::ledger::command::SYSTEM_ACCOUNTS;
use crate::ledger::index::{AccountIndex, LoadError};
use crate::ledger::methods::{MethodKey, Methods, MethodsLoader, Replaced};
use crate::ledger::state_machine::{IdRecord, Reply, ShardState, TopUp, TopUpState};
use crate::ledger::{AccountKind, Channel, Command, FailReason, Status};
use zerocopy::{FromBytes, IntoBytes};

pub const SECTION_META: u32 = 1;
pub const SECTION_ACCOUNTS: u32 = 2;
pub const SECTION_METHODS: u32 = 3;
pub const SECTION_IDS: u32 = 4;
pub const SECTION_TOPUPS: u32 = 5;
pub const SECTION_PENDING: u32 = 6;
pub const SECTION_HISTORY: u32 = 7;
pub const SECTION_OUTBOX: u32 = 8;
pub const SECTION_ACCOUNT_IDS: u32 = 9;
/// The payment method of each top-up, in the top-ups section's order. Optional when loading:
/// a snapshot written before top-ups kept their method has none (the methods are then unknown).
pub const SECTION_TOPUP_METHODS: u32 = 10;
/// The shard's newest feed events (`feed::ShardFeed::encode_tail`, which owns its layout). Not
/// part of the state: `decode` ignores it; recovery hands it to the feed. Optional.
pub const SECTION_FEED_TAIL: u32 = 11;

/// Shape byte of an account record: which fields follow (the others are zero).
const HAS_BALANCE: u8 = 1 << 0;
const HAS_UNION: u8 = 1 << 1;
const HAS_SPENT_TODAY: u8 = 1 << 2;
const HAS_DAILY_CAP: u8 = 1 << 3;
const HAS_HISTORY: u8 = 1 << 4;
const HAS_SPENT_DAY: u8 = 1 << 5;
const HAS_METHODS: u8 = 1 << 6;
/// Kind and flags follow (they differ from the previous account's; the first account's
/// "previous" is kind 0, flags 0, which no account has).
const HAS_KIND_FLAGS: u8 = 1 << 7;
const ID_SIZE: usize = 8 + 8 + 80 + 2 + 1 + 8 + 8;
const TOPUP_SIZE: usize = 8 * 6 + 1 + 1 + 1 + TEXT_LEN + 8 + 1 + 2 + 8 + 8 + 1;
const HISTORY_SIZE: usize = 8 * 7 + 2 + 1;
const OUTBOX_SIZE: usize = 8 + 80;
/// The largest `id_seq` (commands a shard has remembered) a snapshot may hold: 2^62, as for
/// lsns (`wal::LSN_MAX`), which a million commands a second would reach in 146 000 years.
const ID_SEQ_MAX: u64 = 1 << 62;

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn command(&mut self, c: &Command) {
        self.bytes(c.to_record().as_bytes());
    }
    /// LEB128: 7 bits per byte, low groups first, high bit set on every byte but the last.
    #[inline]
    fn varint(&mut self, mut v: u64) {
        if v < 0x80 {
            self.0.push(v as u8);
        } else if v < 1 << 56 {
            // Up to 8 bytes: spread the 7-bit groups over the bytes of a word, set the
            // continuation bits, store the word and keep its first `len` bytes.
            let len = (64 - v.leading_zeros() as usize).div_ceil(7);
            let mut word = 0;
            for group in 0..8 {
                word |= v << group & 0x7f << (8 * group);
            }
            word |= 0x8080_8080_8080_8080 & ((1 << (8 * (len - 1))) - 1);
            let end = self.0.len() + len;
            self.0.extend_from_slice(&word.to_le_bytes());
            self.0.truncate(end);
        } else {
            while v >= 0x80 {
                self.0.push(v as u8 | 0x80);
                v >>= 7;
            }
            self.0.push(v as u8);
        }
    }
}

#[inline]
const fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[inline]
const fn unzigzag(u: u64) -> i64 {
    (u >> 1) as i64 ^ -((u & 1) as i64)
}

/// A bounds-checked little-endian reader; every failure is a decode error naming the section.
#[derive(Clone)]
struct R<'a> {
    b: &'a [u8],
    at: usize,
    section: &'static str,
}

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let slice = self.at.checked_add(n).and_then(|end| self.b.get(self.at..end));
        let slice =
            slice.ok_or_else(|| format!("snapshot section {} is truncated at byte {}", self.section, self.at))?;
        self.at += n;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?.first().copied().unwrap_or(0))
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(self.u64()? as i64)
    }
    fn command(&mut self) -> Result<Command, String> {
        let record = CommandRecord::read_from_bytes(self.take(80)?).map_err(|_| "command record".to_string())?;
        Command::from_record(&record).map_err(|s| format!("snapshot section {}: invalid command ({s})", self.section))
    }
    /// A canonical LEB128 varint (no redundant trailing zero group, at most 64 bits).
    #[inline]
    fn varint(&mut self) -> Result<u64, String> {
        // Most varints in a snapshot are one byte (sequential ids, small counts).
        if let Some(&b) = self.b.get(self.at).filter(|&&b| b < 0x80) {
            self.at += 1;
            return Ok(u64::from(b));
        }
        // Up to 8 bytes, with 8 bytes left to read: find the last byte (high bit clear) in a
        // word and gather the 7-bit groups below it, without a loop.
        if let Some(bytes) = self.b.get(self.at..self.at + 8) {
            let word = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
            let ends = !word & 0x8080_8080_8080_8080;
            if ends != 0 {
                let len = ends.trailing_zeros() as usize / 8 + 1;
                if (word >> (8 * (len - 1))) as u8 == 0 {
                    return Err(self.bad("varint (not minimal)"));
                }
                let word = if len == 8 { word } else { word & ((1 << (8 * len)) - 1) };
                let mut v = 0;
                for group in 0..8 {
                    v |= word >> group & 0x7f << (7 * group);
                }
                self.at += len;
                return Ok(v);
            }
        }
        self.varint_long()
    }
    fn varint_long(&mut self) -> Result<u64, String> {
        let rest = self.b.get(self.at..).unwrap_or_default();
        let mut v = 0u64;
        for (i, &b) in rest.iter().take(10).enumerate() {
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                if i == 9 && b > 1 {
                    return Err(self.bad("varint (over 64 bits)"));
                }
                if b == 0 && i > 0 {
                    return Err(self.bad("varint (not minimal)"));
                }
                self.at += i + 1;
                return Ok(v);
            }
        }
        if rest.len() < 10 {
            Err(format!("snapshot section {} is truncated at byte {}", self.section, self.b.len()))
        } else {
            Err(self.bad("varint (over 10 bytes)"))
        }
    }
    /// A varint that the shape byte says is present, so it must not be zero.
    #[inline]
    fn nonzero(&mut self) -> Result<u64, String> {
        match self.varint()? {
            0 => Err(self.bad("field (present but zero)")),
            v => Ok(v),
        }
    }
    fn done(&self) -> bool {
        self.at == self.b.len()
    }
    fn bad(&self, what: &str) -> String {
        format!("snapshot section {}: invalid {what} at byte {}", self.section, self.at)
    }
}

fn reply_fields(w: &mut W, r: &Reply) {
    w.u16(r.status.code());
    w.u8(r.duplicate as u8);
    w.i64(r.value);
    w.i64(r.value2);
}

fn read_reply(r: &mut R) -> Result<Reply, String> {
    let status = Status::from_code(r.u16()?).ok_or_else(|| r.bad("status"))?;
    let duplicate = r.u8()? != 0;
    Ok(Reply { status, duplicate, value: r.i64()?, value2: r.i64()? })
}

/// The sections of a shard's snapshot, in one go. The payment methods (a merge of the loaded,
/// sorted bindings with the sorted later ones) and then the idempotency records are encoded on
/// a second thread while this one encodes the rest. (A shard's worker encodes in steps instead:
/// `begin_encoding`.)
pub fn encode(state: &ShardState) -> Vec<(u32, Vec<u8>)> {
    let mut buffers = SectionBuffers::default();
    let methods_buffer = buffers.take(SECTION_METHODS, 8 + state.methods.len() * 3);
    let ids_buffer = buffers.take(SECTION_IDS, state.id_ring.len() * ID_SIZE);
    let history_buffer = history_buffer(state, &mut buffers);
    std::thread::scope(|s| {
        let second = s.spawn(|| {
            let methods = encode_methods(state.methods.len(), state.methods.sorted(), methods_buffer);
            (methods, encode_ids(state, ids_buffer))
        });
        let mut accounts = AccountsEncoder::new(state.accounts.len(), &mut buffers);
        for account in &state.accounts {
            accounts.push(account);
        }
        let mut pending = pending_buffer(state, &mut buffers);
        for entry in &state.pending {
            encode_pending(&mut pending, entry);
        }
        let mut sections = encode_rest(state, &mut buffers);
        sections.extend(encode_topups(state, &mut buffers));
        sections.extend(accounts.finish());
        sections.push((SECTION_HISTORY, encode_history(state, history_buffer)));
        sections.push((SECTION_PENDING, pending.0));
        let (methods, ids) = joined(second);
        sections.extend([(SECTION_METHODS, methods), (SECTION_IDS, ids)]);
        in_order(sections)
    })
}

/// `encode` as a shard's worker does it (`begin_encoding`, then every step at once): into the
/// buffers of the snapshot it wrote before (see `SectionBuffers`), and compacting the payment
/// methods on the way when that is worth it (`Methods::worth_compacting`; the bytes are the
/// same either way). The state then holds the compacted methods, and the ones they replace are
/// returned, for the caller to drop off the worker's thread.
///
/// Why: the methods section lists every binding in order, and bindings made since the last load
/// sit in a hash map that each snapshot had to collect and sort. With 10 M of them that was
/// 0.75-0.86 s of the encode, its longest part (docs/benchmarks.md, session 9). Compacted, the
/// next snapshot reads them in order from the arrays, and only the bindings made since are sorted.
pub fn encode_compacting(state: &mut ShardState, buffers: SectionBuffers) -> (Vec<(u32, Vec<u8>)>, Option<Replaced>) {
    begin_encoding(state, buffers).complete(state)
}

/// The order of a snapshot's sections (docs/wal-format.md).
const SECTION_ORDER: [u32; 10] = [
    SECTION_META,
    SECTION_ACCOUNT_IDS,
    SECTION_ACCOUNTS,
    SECTION_METHODS,
    SECTION_IDS,
    SECTION_TOPUPS,
    SECTION_TOPUP_METHODS,
    SECTION_PENDING,
    SECTION_HISTORY,
    SECTION_OUTBOX,
];

/// `sections` (each of `SECTION_ORDER` once) in that order.
fn in_order(mut sections: Vec<(u32, Vec<u8>)>) -> Vec<(u32, Vec<u8>)> {
    sections.sort_by_key(|(tag, _)| SECTION_ORDER.iter().position(|t| t == tag).expect("a known section"));
    assert_eq!(sections.len(), SECTION_ORDER.len(), "every section once");
    sections
}

/// A snapshot being encoded while its shard goes on (`begin_encoding`): every section is done
/// but the accounts, the idempotency records, the history, the pending deadlines and the
/// top-ups, which are pinned (`ShardState::pin_accounts`, `pin_rings`, `TopUps::pin`) and
/// encoded a budget of records at a time (`step`; the top-ups once a thread has sorted them),
/// and the payment methods, which are frozen (`Methods::freeze`) and sorted, encoded and, when
/// worth it, compacted on a thread of their own; then `finish`.
///
/// Why: those four are most of a snapshot (at the default windows, 2^20 idempotency records of
/// 115 bytes and 2^20 history entries of 59: 174 of the 216 MiB of a shard of 500 000 funded
/// users; the accounts and the methods grow with the users), and encoding them in one go
/// stalled the shard for as long (docs/benchmarks.md, session 12). A step is a pause of a
/// millisecond or two between batches.
pub struct Encoding {
    rest: Vec<(u32, Vec<u8>)>,
    accounts: AccountsEncoder,
    ids: W,
    history: W,
    pending: W,
    topups: TopUpsEncoder,
    methods: MethodsJob,
}

/// The top-ups' part of an `Encoding`: the store is pinned (`TopUps::pin`), its `(id, slot)`
/// pairs are sorted by id on a thread of their own, and then encoded a step at a time.
///
/// Why: with 262 144 top-ups (a shard of 500 000 users after a storm) the section took 12 ms in
/// one go (timers, session 12), most of a snapshot's pause at its start: 0.015-0.016 s, and
/// 0.001 s with the top-ups pinned (docs/benchmarks.md, session 13).
struct TopUpsEncoder {
    topups: W,
    methods: W,
    order: TopUpsOrder,
}

enum TopUpsOrder {
    Sorting(std::thread::JoinHandle<Vec<(u64, u32)>>),
    /// Sorted, and how many are encoded.
    Sorted(Vec<(u64, u32)>, usize),
}

impl TopUpsEncoder {
    fn begin(state: &mut ShardState, buffers: &mut SectionBuffers) -> TopUpsEncoder {
        let n = state.topups.len();
        let topups = buffers.take(SECTION_TOPUPS, n * TOPUP_SIZE);
        let methods = buffers.take(SECTION_TOPUP_METHODS, n * 9);
        let mut order = state.topups.pin();
        let job = std::thread::Builder::new()
            .name(format!("snapshot-topups-{}", state.shard))
            .spawn(move || {
                order.sort_unstable_by_key(|e| e.0);
                order
            })
            .expect("spawn the snapshot's top-ups thread");
        TopUpsEncoder { topups, methods, order: TopUpsOrder::Sorting(job) }
    }

    /// Encodes up to `budget` pinned top-ups, once they are sorted (waiting for the sort if
    /// `wait`, else answering `Waiting` while it runs).
    fn step(&mut self, state: &ShardState, budget: usize, wait: bool) -> Progress {
        if let TopUpsOrder::Sorting(job) = &self.order {
            if !wait && !job.is_finished() {
                return Progress::Waiting;
            }
            let placeholder = TopUpsOrder::Sorted(Vec::new(), 0);
            if let TopUpsOrder::Sorting(job) = std::mem::replace(&mut self.order, placeholder) {
                let sorted = job.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                self.order = TopUpsOrder::Sorted(sorted, 0);
            }
        }
        let TopUpsOrder::Sorted(order, next) = &mut self.order else { unreachable!("sorted above") };
        let end = next.saturating_add(budget).min(order.len());
        for (i, &(id, slot)) in order.iter().enumerate().take(end).skip(*next) {
            // The pinned top-ups lie all over the store: prefetch a few ahead.
            if let Some(&(ahead, slot)) = order.get(i + 8) {
                crate::ledger::index::prefetch((state.topups.pinned(ahead, slot) as *const TopUp).cast());
            }
            encode_topup(&mut self.topups, &mut self.methods, id, state.topups.pinned(id, slot));
        }
        *next = end;
        if end == order.len() {
            Progress::Done
        } else {
            Progress::Steps
        }
    }
}

/// The payment methods' part of an `Encoding`.
enum MethodsJob {
    /// Their section, and the bindings compacted into sorted arrays if that was worth it.
    Running(std::thread::JoinHandle<(Vec<u8>, Option<Methods>)>),
    /// The section, and what the compaction replaced in the shard (`Methods::thaw`).
    Done(Vec<u8>, Option<Replaced>),
}

/// What `Encoding::step` left to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Records to encode: step again soon.
    Steps,
    /// Only the threads (the payment methods', the top-ups' sort): step again when they are done.
    Waiting,
    /// Everything: `finish`.
    Done,
}

/// Starts a snapshot of `state` as a shard's worker does (see `encode_compacting`, whose
/// sections `Encoding::finish` then returns, byte for byte): the small sections now, the rest
/// left to `Encoding::step` and the payment methods' thread.
pub fn begin_encoding(state: &mut ShardState, mut buffers: SectionBuffers) -> Encoding {
    let methods_buffer = buffers.take(SECTION_METHODS, 8 + state.methods.len() * 3);
    let ids = buffers.take(SECTION_IDS, state.id_ring.len() * ID_SIZE);
    let history = history_buffer(state, &mut buffers);
    let accounts = AccountsEncoder::new(state.accounts.len(), &mut buffers);
    let pending = pending_buffer(state, &mut buffers);
    let rest = encode_rest(state, &mut buffers);
    let topups = TopUpsEncoder::begin(state, &mut buffers);
    let frozen = state.methods.freeze();
    let job = std::thread::Builder::new()
        .name(format!("snapshot-methods-{}", state.shard))
        .spawn(move || {
            let compacted = frozen.worth_compacting().then(|| frozen.compacted());
            let section = match &compacted {
                // The same bindings in the same order; the arrays need no sort.
                Some(methods) => encode_methods(methods.len(), methods.sorted(), methods_buffer),
                None => encode_methods(frozen.len(), frozen.sorted(), methods_buffer),
            };
            (section, compacted)
        })
        .expect("spawn the snapshot's methods thread");
    state.pin_accounts();
    state.pin_rings();
    Encoding { rest, accounts, ids, history, pending, topups, methods: MethodsJob::Running(job) }
}

/// Encodes up to `budget` records taken from `next`; true when `next` has none left.
#[inline]
fn encode_some<T>(budget: usize, mut next: impl FnMut() -> Option<T>, mut encode: impl FnMut(T)) -> bool {
    for _ in 0..budget {
        match next() {
            Some(record) => encode(record),
            None => return true,
        }
    }
    false
}

impl Encoding {
    /// Encodes up to `budget` more records of each pinned part (three times that of the
    /// history), and takes the payment methods' result if their thread is done (non-blocking).
    pub fn step(&mut self, state: &mut ShardState, budget: usize) -> Progress {
        self.step_or_wait(state, budget, false)
    }

    /// `step`, which with `wait` waits for the threads instead of answering `Waiting`.
    fn step_or_wait(&mut self, state: &mut ShardState, budget: usize, wait: bool) -> Progress {
        let accounts_done = encode_some(budget, || state.next_pinned_account(), |a| self.accounts.push(&a));
        let ids_done =
            encode_some(budget, || state.next_pinned_id(), |(seq, r)| encode_id_record(&mut self.ids, seq, &r));
        // A spend pushes up to three history entries (payer, streamer, union) and evicts as
        // many: three times the budget keeps the encoder ahead of the evictions.
        let history_done = encode_some(
            budget.saturating_mul(3),
            || state.history.next_pinned(),
            |e| encode_history_entry(&mut self.history, &e),
        );
        let pending_done =
            encode_some(budget, || state.next_pinned_pending(), |e| encode_pending(&mut self.pending, &e));
        // A quarter of the budget: a top-up's record is 103 bytes, an account's a few.
        let topups = self.topups.step(state, (budget / 4).max(1), wait);
        if !(accounts_done && ids_done && history_done && pending_done) || topups == Progress::Steps {
            return Progress::Steps;
        }
        if topups == Progress::Waiting {
            return Progress::Waiting;
        }
        match &self.methods {
            MethodsJob::Running(job) if !wait && !job.is_finished() => Progress::Waiting,
            MethodsJob::Running(_) => {
                self.join_methods(state);
                Progress::Done
            }
            MethodsJob::Done(..) => Progress::Done,
        }
    }

    /// Waits for the payment methods' thread, and thaws the shard's methods.
    fn join_methods(&mut self, state: &mut ShardState) {
        if let MethodsJob::Done(..) = self.methods {
            return;
        }
        let placeholder = MethodsJob::Done(Vec::new(), None);
        if let MethodsJob::Running(job) = std::mem::replace(&mut self.methods, placeholder) {
            let (section, compacted) = job.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            let replaced = state.methods.thaw(compacted);
            self.methods = MethodsJob::Done(section, replaced);
        }
    }

    /// `step` with no budget, waiting for the payment methods' thread, then `finish`.
    pub fn complete(mut self, state: &mut ShardState) -> (Vec<(u32, Vec<u8>)>, Option<Replaced>) {
        while self.step_or_wait(state, usize::MAX, true) != Progress::Done {}
        self.join_methods(state);
        self.finish(state)
    }

    /// The snapshot's sections, once `step` said `Done`; unpins the accounts and rings. Also
    /// what the methods' compaction replaced, for the caller to drop off the shard's thread.
    pub fn finish(self, state: &mut ShardState) -> (Vec<(u32, Vec<u8>)>, Option<Replaced>) {
        let MethodsJob::Done(methods, replaced) = self.methods else { panic!("the methods' thread is not done") };
        state.unpin_accounts();
        state.unpin_rings();
        state.topups.unpin();
        let mut sections = self.rest;
        sections.extend(self.accounts.finish());
        sections.extend([
            (SECTION_METHODS, methods),
            (SECTION_IDS, self.ids.0),
            (SECTION_HISTORY, self.history.0),
            (SECTION_PENDING, self.pending.0),
            (SECTION_TOPUPS, self.topups.topups.0),
            (SECTION_TOPUP_METHODS, self.topups.methods.0),
        ]);
        (in_order(sections), replaced)
    }
}

/// The section buffers of a snapshot already written, handed back to encode the next one into.
///
/// A snapshot's sections are as large as its file (215 MiB for a shard of 500 000 funded users
/// with full idempotency and history windows), and fresh memory of that size is a page fault
/// per 4 KiB page, the kernel zeroing each: in `perf` of such an encode the page faults were
/// about 40 % of its time, and the encode stalls the shard. The buffers are reused in place (the
/// worker keeps the last snapshot's), so every snapshot after a shard's first writes into
/// memory that is already resident. The price is that memory: one snapshot's size per shard.
#[derive(Default)]
pub struct SectionBuffers(Vec<(u32, Vec<u8>)>);

impl SectionBuffers {
    /// The buffers of `sections` (their contents are dropped when reused).
    pub fn new(sections: Vec<(u32, Vec<u8>)>) -> SectionBuffers {
        SectionBuffers(sections)
    }

    /// The earlier snapshot's buffer of section `tag` (or a new one), for a section encoded
    /// outside this module.
    pub fn take_raw(&mut self, tag: u32) -> Vec<u8> {
        self.take(tag, 0).0
    }

    /// An empty writer for section `tag` with room for `capacity` bytes: the buffer the earlier
    /// snapshot used for that section if there is one, else a new one.
    fn take(&mut self, tag: u32, capacity: usize) -> W {
        let mut buffer = match self.0.iter().position(|(t, _)| *t == tag) {
            Some(i) => self.0.swap_remove(i).1,
            None => Vec::new(),
        };
        buffer.clear();
        buffer.reserve(capacity);
        W(buffer)
    }
}

/// The idempotency records section, oldest first.
fn encode_ids(state: &ShardState, mut ids: W) -> Vec<u8> {
    for (seq, record) in &state.id_ring {
        encode_id_record(&mut ids, *seq, record);
    }
    ids.0
}

#[inline]
fn encode_id_record(w: &mut W, seq: u64, record: &IdRecord) {
    w.u64(seq);
    w.u64(record.timestamp);
    w.command(&record.command);
    reply_fields(w, &record.reply);
}

fn pending_buffer(state: &ShardState, buffers: &mut SectionBuffers) -> W {
    buffers.take(SECTION_PENDING, state.pending.len() * 16)
}

#[inline]
fn encode_pending(w: &mut W, &(deadline, id): &(u64, u64)) {
    w.u64(deadline);
    w.u64(id);
}

fn history_buffer(state: &ShardState, buffers: &mut SectionBuffers) -> W {
    buffers.take(SECTION_HISTORY, state.history.capacity().min(state.history.appended()) as usize * HISTORY_SIZE)
}

/// The history section: the retained entries, oldest first.
fn encode_history(state: &ShardState, mut history: W) -> Vec<u8> {
    for (_, e) in state.history.retained() {
        encode_history_entry(&mut history, e);
    }
    history.0
}

#[inline]
fn encode_history_entry(w: &mut W, e: &HistoryEntry) {
    w.u64(e.prev);
    w.u64(e.timestamp);
    w.u64(e.id);
    w.u64(e.counterparty);
    w.i64(e.amount);
    w.i64(e.balance_after);
    w.u64(e.detail);
    w.u16(e.status);
    w.u8(e.kind);
}

/// The top-ups sections in one go, sorted by id (`encode`; a worker's snapshot takes them a step
/// at a time, `TopUpsEncoder`).
fn encode_topups(state: &ShardState, buffers: &mut SectionBuffers) -> [(u32, Vec<u8>); 2] {
    // Sorted as (id, reference) pairs, not as copies of the top-ups (16 bytes moved instead of
    // 128): with 262 144 top-ups the collect and sort of copies took 26-32 ms, the whole section
    // with pairs 12 ms (docs/benchmarks.md, session 12). The references then point all over
    // the store: prefetched a few ahead.
    let mut sorted: Vec<(u64, &TopUp)> = state.topups.iter().map(|(&k, v)| (k, v)).collect();
    sorted.sort_unstable_by_key(|e| e.0);
    let mut topups = buffers.take(SECTION_TOPUPS, sorted.len() * TOPUP_SIZE);
    let mut methods = buffers.take(SECTION_TOPUP_METHODS, sorted.len() * 9);
    for (i, &(id, t)) in sorted.iter().enumerate() {
        if let Some((_, ahead)) = sorted.get(i + 8) {
            crate::ledger::index::prefetch((*ahead as *const TopUp).cast());
        }
        encode_topup(&mut topups, &mut methods, id, t);
    }
    [(SECTION_TOPUPS, topups.0), (SECTION_TOPUP_METHODS, methods.0)]
}

/// One top-up's records in the top-ups section and in the top-ups' methods section.
fn encode_topup(topups: &mut W, methods: &mut W, id: u64, t: &TopUp) {
    methods.u8(t.method.is_some() as u8);
    methods.u64(t.method.unwrap_or(0));
    topups.u64(id);
    topups.u64(t.user);
    topups.u64(t.fen);
    topups.u64(t.coins);
    topups.u64(t.deadline);
    topups.u64(t.confirmed_fen);
    topups.u8(t.channel as u8);
    topups.u8(t.state as u8);
    topups.u8(t.fail_reason.map_or(0, |r| r as u8));
    topups.bytes(&t.channel_txn);
    match t.confirm_reply {
        Some(r) => {
            topups.u8(1);
            reply_fields(topups, &r);
        }
        None => {
            topups.u8(0);
            reply_fields(topups, &Reply::status(Status::Ok));
        }
    }
    topups.u8(t.id_evicted as u8);
}

/// The small sections: all but the accounts, the payment methods, the idempotency records, the
/// history, the pending top-ups and the top-ups.
fn encode_rest(state: &ShardState, buffers: &mut SectionBuffers) -> Vec<(u32, Vec<u8>)> {
    assert!(state.evicted.is_empty(), "evicted ids are drained after every batch");
    let mut meta = buffers.take(SECTION_META, 64);
    meta.u16(state.shard);
    meta.u16(state.shards);
    meta.u64(state.last_timestamp);
    meta.u64(state.id_seq);
    meta.u64(state.replica_out);
    meta.u64(state.history.appended());
    for &r in &state.replica_in {
        meta.u64(r);
    }

    let mut outbox = buffers.take(SECTION_OUTBOX, state.outbox.len() * OUTBOX_SIZE);
    for (seq, c) in &state.outbox {
        outbox.u64(*seq);
        outbox.command(c);
    }

    vec![(SECTION_META, meta.0), (SECTION_OUTBOX, outbox.0)]
}

/// The account ids section (a u64 count, then the ids as zigzag varint deltas, each from the
/// previous id, the first from 0) and the account records section (per account a shape byte,
/// kind and flags if they changed, then the non-zero fields as varints), both in creation order.
/// Encoded one account at a time (`push`), so that a snapshot can take them a step at a time.
struct AccountsEncoder {
    ids: W,
    records: W,
    previous_id: u64,
    previous_kind_flags: (u8, u8),
}

impl AccountsEncoder {
    /// For `count` accounts; sizes its buffers for them.
    fn new(count: usize, buffers: &mut SectionBuffers) -> AccountsEncoder {
        // Sequential ids take one byte each; a user with a balance, a day's spending and history
        // about a dozen record bytes. Reserve for that; the vectors grow if it is more.
        let mut ids = buffers.take(SECTION_ACCOUNT_IDS, 8 + count * 2);
        let records = buffers.take(SECTION_ACCOUNTS, count * 12);
        ids.u64(count as u64);
        AccountsEncoder { ids, records, previous_id: 0, previous_kind_flags: (0, 0) }
    }

    /// The two sections.
    fn finish(self) -> [(u32, Vec<u8>); 2] {
        [(SECTION_ACCOUNT_IDS, self.ids.0), (SECTION_ACCOUNTS, self.records.0)]
    }

    #[inline]
    fn push(&mut self, a: &Account) {
        let (ids, records) = (&mut self.ids, &mut self.records);
        ids.varint(zigzag(a.id.wrapping_sub(self.previous_id) as i64));
        self.previous_id = a.id;
        let kind_flags = (a.kind as u8, a.flags);
        let previous_kind_flags = &mut self.previous_kind_flags;
        let shape = if a.balance != 0 { HAS_BALANCE } else { 0 }
            | if a.union != 0 { HAS_UNION } else { 0 }
            | if a.spent_today != 0 { HAS_SPENT_TODAY } else { 0 }
            | if a.daily_cap != 0 { HAS_DAILY_CAP } else { 0 }
            | if a.history_head != 0 { HAS_HISTORY } else { 0 }
            | if a.spent_day != 0 { HAS_SPENT_DAY } else { 0 }
            | if a.methods != 0 { HAS_METHODS } else { 0 }
            | if kind_flags != *previous_kind_flags { HAS_KIND_FLAGS } else { 0 };
        records.u8(shape);
        if shape & HAS_KIND_FLAGS != 0 {
            records.u8(kind_flags.0);
            records.u8(kind_flags.1);
            *previous_kind_flags = kind_flags;
        }
        if a.balance != 0 {
            records.varint(zigzag(a.balance));
        }
        for (bit, v) in [
            (HAS_UNION, a.union),
            (HAS_SPENT_TODAY, a.spent_today),
            (HAS_DAILY_CAP, a.daily_cap),
            (HAS_HISTORY, a.history_head),
            (HAS_SPENT_DAY, u64::from(a.spent_day)),
        ] {
            if shape & bit != 0 {
                records.varint(v);
            }
        }
        if a.methods != 0 {
            records.u8(a.methods);
        }
    }
}

/// The payment methods section: a u64 count, then per binding, sorted by (user, method): the
/// user as a varint delta from the previous binding's (the first from 0), the method as a
/// varint, the channel code as one byte.
fn encode_methods(len: usize, sorted: impl Iterator<Item = (MethodKey, Channel)>, mut w: W) -> Vec<u8> {
    w.u64(len as u64);
    let mut previous_user = 0;
    for ((user, method), channel) in sorted {
        w.varint(user - previous_user);
        w.varint(method);
        w.u8(channel as u8);
        previous_user = user;
    }
    w.0
}

/// The payment methods section back into sorted arrays (`ledger::methods`): one sequential
/// pass, the section being in the arrays' order already.
fn decode_methods(b: &[u8]) -> Result<Methods, String> {
    let mut r = R { b, at: 0, section: "methods" };
    let count = r.u64()?;
    // At least 3 bytes each: a damaged count cannot make this reserve more than the file.
    if count > (b.len() / 3) as u64 {
        return Err(r.bad("count"));
    }
    let mut loader = MethodsLoader::with_capacity(count as usize);
    let mut previous_user = 0u64;
    for _ in 0..count {
        let user = r.varint()?.checked_add(previous_user).ok_or_else(|| r.bad("user"))?;
        let method = r.varint()?;
        let channel = Channel::from_code(u16::from(r.u8()?)).ok_or_else(|| r.bad("channel"))?;
        loader.push(user, method, channel).map_err(|_| r.bad("binding (not in ascending order)"))?;
        previous_user = user;
    }
    if !r.done() {
        return Err(r.bad("length"));
    }
    Ok(loader.finish())
}

/// The ids of an account ids section, stopping at the first malformed one (which
/// `decode_accounts` reports).
#[derive(Clone)]
struct IdIter<'a>(IdReader<'a>, u64);

impl Iterator for IdIter<'_> {
    type Item = u64;
    #[inline]
    fn next(&mut self) -> Option<u64> {
        if self.1 == 0 {
            return None;
        }
        self.1 -= 1;
        let id = self.0.next().ok();
        if id.is_none() {
            self.1 = 0;
        }
        id
    }
}

/// Reads the account ids section: its count, then one id per `next`.
#[derive(Clone)]
struct IdReader<'a> {
    r: R<'a>,
    previous: u64,
}

impl<'a> IdReader<'a> {
    fn new(b: &'a [u8]) -> Result<(IdReader<'a>, u64), String> {
        let mut r = R { b, at: 0, section: "account ids" };
        let count = r.u64()?;
        Ok((IdReader { r, previous: 0 }, count))
    }
    #[inline]
    fn next(&mut self) -> Result<u64, String> {
        self.previous = self.previous.wrapping_add(unzigzag(self.r.varint()?) as u64);
        Ok(self.previous)
    }
}

/// Accounts whose memory `decode_accounts` populates at a time (3.5 MiB).
const POPULATE_AHEAD: u64 = 1 << 16;

/// Decodes `count` account records into `accounts` and publishes their balances in `index`
/// (whose entries another thread fills at the same time).
/// Decodes the account records into `accounts` and publishes their balances; returns how many
/// are user wallets and how many are striped accounts that `homed` (`ShardState::users`,
/// `ShardState::striped_homed`).
fn decode_accounts(
    ids: &[u8],
    records: &[u8],
    accounts: &mut Vec<Account>,
    index: &AccountIndex,
    homed: impl Fn(u64) -> bool,
) -> Result<(u32, u32), String> {
    let (mut ids, count) = IdReader::new(ids)?;
    let mut r = R { b: records, at: 0, section: "accounts" };
    let (mut kind, mut flags) = (None, 0u8);
    let (mut users, mut striped_homed) = (0u32, 0u32);
    for slot in 0..count {
        if slot % POPULATE_AHEAD == 0 {
            // The vector's memory is fresh: one call per block makes its pages, instead of a
            // page fault each (10-25% less CPU for this function on the development VM).
            let block = POPULATE_AHEAD.min(count - slot) as usize;
            let spare = accounts.spare_capacity_mut();
            crate::ledger::index::populate_writable(spare.get(..block).unwrap_or(spare));
        }
        let id = ids.next()?;
        let shape = r.u8()?;
        if shape & HAS_KIND_FLAGS != 0 {
            let (k, f) = (r.u8()?, r.u8()?);
            if kind.is_some_and(|kind: AccountKind| (kind as u8, flags) == (k, f)) {
                return Err(r.bad("account shape (kind and flags repeated)"));
            }
            kind = Some(AccountKind::from_code(u16::from(k)).ok_or_else(|| r.bad("account kind"))?);
            flags = f;
        }
        let kind = kind.ok_or_else(|| r.bad("account shape (no kind)"))?;
        let mut field = |bit: u8| if shape & bit != 0 { r.nonzero() } else { Ok(0) };
        let balance = unzigzag(field(HAS_BALANCE)?);
        let union = field(HAS_UNION)?;
        let spent_today = field(HAS_SPENT_TODAY)?;
        let daily_cap = field(HAS_DAILY_CAP)?;
        let history_head = field(HAS_HISTORY)?;
        let spent_day = field(HAS_SPENT_DAY)?;
        let spent_day = u32::try_from(spent_day).map_err(|_| r.bad("spent day"))?;
        let methods = if shape & HAS_METHODS != 0 {
            match r.u8()? {
                0 => return Err(r.bad("methods (present but zero)")),
                m => m,
            }
        } else {
            0
        };
        accounts.push(Account {
            id,
            balance,
            union,
            spent_today,
            daily_cap,
            history_head,
            spent_day,
            kind,
            flags,
            methods,
        });
        if balance != 0 {
            index.publish(slot as u32, balance);
        }
        if kind == AccountKind::User {
            users += 1;
        } else if homed(id) {
            striped_homed += 1;
        }
    }
    if !ids.r.done() {
        return Err(ids.r.bad("length"));
    }
    if !r.done() {
        return Err(r.bad("length"));
    }
    Ok((users, striped_homed))
}

/// A helper thread's result; its panic goes on in the caller.
fn joined<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Rebuilds a shard from its sections. `section(tag)` returns a section's bytes.
pub fn decode<'a>(
    section: impl Fn(u32) -> Option<&'a [u8]>,
    config: LedgerConfig,
    limits: ShardLimits,
) -> Result<ShardState, String> {
    let get = |tag: u32, name: &'static str| {
        section(tag).map(|b| R { b, at: 0, section: name }).ok_or_else(|| format!("snapshot has no {name} section"))
    };
    let mut m = get(SECTION_META, "meta")?;
    let shard = m.u16()?;
    let shards = m.u16()?;
    if shard >= shards {
        return Err(m.bad("shard number"));
    }
    // Without the huge-page hints: filled all at once with them, the kernel would compact
    // memory for every 2 MiB page (see `mem`). The account vector and index are advised once
    // filled.
    let mut state = ShardState::new_unadvised(shard, shards, config, limits.clone());
    // Genesis created the system accounts; the snapshot has them (with balances), so start empty.
    state.accounts.clear();
    state.last_timestamp = m.u64()?;
    state.id_seq = m.u64()?;
    state.replica_out = m.u64()?;
    let history_next = m.u64()?;
    for slot in state.replica_in.iter_mut() {
        *slot = m.u64()?;
    }
    if !m.done() {
        return Err(m.bad("length"));
    }

    // Accounts and payment methods, the sections that grow with the user base, on two threads:
    // this one decodes the account records (sequential writes); a helper fills the account
    // index from the ids (random access, see `load`), then the methods' sorted arrays
    // (sequential, `decode_methods`). Two threads for two cores: with the methods on a third
    // thread, the three shared the cores and the records, the longest part, finished later
    // (the recovery bench's 10 M funded users, 32 loads each way, alternating on the
    // development VM: 0.69-1.05 s here, 0.76-1.26 s with three threads).
    let section_of = |tag: u32, name: &str| section(tag).ok_or_else(|| format!("snapshot has no {name} section"));
    let ids_section = section_of(SECTION_ACCOUNT_IDS, "account ids")?;
    let records = section_of(SECTION_ACCOUNTS, "accounts")?;
    let methods_section = section_of(SECTION_METHODS, "methods")?;
    let (ids, count) = IdReader::new(ids_section)?;
    if count > u64::from(limits.accounts_max) {
        return Err(format!("snapshot holds {count} accounts, more than accounts_max ({})", limits.accounts_max));
    }
    let index = AccountIndex::new(limits.accounts_max);
    let accounts = &mut state.accounts;
    let (decoded, (indexed, bound)) = std::thread::scope(|s| {
        let helper = s.spawn(|| (index.load(IdIter(ids, count)), decode_methods(methods_section)));
        let homed = |id| crate::ledger::state_machine::homed_on(id, shard, shards);
        let decoded = decode_accounts(ids_section, records, accounts, &index, homed);
        (decoded, joined(helper))
    });
    // A malformed id stops the index early; `decode_accounts` names it, so its error comes first.
    (state.users, state.striped_homed) = decoded?;
    match indexed {
        Ok(n) if u64::from(n) == count => {}
        Err(LoadError::Duplicate { slot, id }) => {
            return Err(format!("snapshot section accounts: account {id} at position {slot} is a duplicate"))
        }
        Err(LoadError::Zero { slot }) => {
            return Err(format!("snapshot section accounts: account id 0 at position {slot}"))
        }
        other => return Err(format!("snapshot section account ids: loading the index failed ({other:?})")),
    }
    state.methods = bound?;
    index.advise_huge();
    crate::mem::advise_huge(state.accounts.as_ptr() as *const u8, state.accounts.capacity() * size_of::<Account>());
    state.index = std::sync::Arc::new(index);
    // The system accounts come first, in their fixed order (the state machine reaches the
    // platform account by its slot).
    for (slot, &(id, kind)) in SYSTEM_ACCOUNTS.iter().enumerate() {
        if !state.accounts.get(slot).is_some_and(|a| a.id == id && a.kind == kind) {
            return Err(format!("snapshot section accounts: system account {id} is not at position {slot}"));
        }
    }

    let mut r = get(SECTION_IDS, "ids")?;
    let mut ring = VecDeque::new();
    // The records' sequence numbers are consecutive and end at the meta's `id_seq` - 1 (a record
    // is found by its distance from the oldest, `record_at`). `id_seq` is at most `ID_SEQ_MAX`,
    // far below the value that marks a held top-up id in the table, and `seq + 1` never wraps.
    let count = (r.b.len() / ID_SIZE) as u64;
    if state.id_seq < count || state.id_seq > ID_SEQ_MAX {
        return Err(format!("snapshot section meta: id_seq {} does not fit {count} idempotency records", state.id_seq));
    }
    while !r.done() {
        let seq = r.u64()?;
        let expected = state.id_seq - count + ring.len() as u64;
        if seq != expected {
            return Err(format!(
                "snapshot section ids: record {} has sequence number {seq}, not {expected}",
                ring.len()
            ));
        }
        let timestamp = r.u64()?;
        let command = r.command()?;
        let reply = read_reply(&mut r)?;
        ring.push_back((seq, IdRecord { timestamp, command, reply }));
    }
    if ring.len() > limits.ids_max as usize {
        return Err("snapshot holds more ids than ids_max".into());
    }
    for (seq, record) in &ring {
        let id = record.command.transfer_id().unwrap_or_else(|| record.command.reply_id());
        state.ids.insert(id, *seq);
    }
    state.id_ring = ring;

    let mut r = get(SECTION_TOPUPS, "topups")?;
    let mut methods = section(SECTION_TOPUP_METHODS).map(|b| R { b, at: 0, section: "top-up methods" });
    // Sorted by id, each once; ids are never 0.
    let mut previous_id = 0;
    while !r.done() {
        let id = r.u64()?;
        if id <= previous_id {
            return Err(format!(
                "snapshot section topups: top-up id {id} does not follow {previous_id} (ascending, above 0)"
            ));
        }
        previous_id = id;
        let method = match methods.as_mut() {
            Some(m) => match (m.u8()?, m.u64()?) {
                (1, method) => Some(method),
                (0, 0) => None,
                _ => return Err(m.bad("method")),
            },
            None => None,
        };
        let user = r.u64()?;
        let fen = r.u64()?;
        let coins = r.u64()?;
        let deadline = r.u64()?;
        let confirmed_fen = r.u64()?;
        let channel = Channel::from_code(r.u8()? as u16).ok_or_else(|| r.bad("channel"))?;
        let state_code = r.u8()?;
        let topup_state = TopUpState::from_code(state_code as i64).ok_or_else(|| r.bad("top-up state"))?;
        let fail_reason = match r.u8()? {
            0 => None,
            c => Some(FailReason::from_code(c as u16).ok_or_else(|| r.bad("fail reason"))?),
        };
        let channel_txn: [u8; TEXT_LEN] = r.take(TEXT_LEN)?.try_into().expect("TEXT_LEN bytes");
        let has_reply = r.u8()? != 0;
        let reply = read_reply(&mut r)?;
        let id_evicted = r.u8()? != 0;
        let topup = TopUp {
            user,
            method,
            channel,
            fen,
            coins,
            deadline,
            state: topup_state,
            fail_reason,
            channel_txn,
            confirmed_fen,
            confirm_reply: has_reply.then_some(reply),
            id_evicted,
        };
        if topup.id_evicted {
            if state.held_topup_ids >= crate::ledger::state_machine::held_topup_ids_max(&limits) {
                return Err("snapshot holds more top-ups outside the idempotency window than ids_max allows".into());
            }
            if state.knows_id(id) {
                return Err(format!("snapshot holds top-up {id} both in and outside the idempotency window"));
            }
            state.hold_topup_id(id);
        }
        if topup.id_evicted && topup.state != TopUpState::Pending {
            state.topups_kept.insert((topup.deadline, id));
        }
        if topup.state == TopUpState::Pending {
            state.topups_pending += 1;
        }
        state.topups.insert(id, topup);
    }
    if let Some(m) = methods {
        if !m.done() {
            return Err(m.bad("length"));
        }
    }

    // The queue of deadlines, in the order top-ups began: so by deadline, each later than the
    // one before (a shard's timestamps increase, and the time to live is the directory's). An
    // entry of a top-up that ended before its deadline stays until then; every pending top-up
    // has its entry, or it would never expire. (A top-up has one deadline, and deadlines are
    // distinct, so each entry names at most one pending top-up and none is counted twice.)
    let mut r = get(SECTION_PENDING, "pending")?;
    let mut previous_deadline = 0;
    let mut queued = 0;
    while !r.done() {
        let (deadline, id) = (r.u64()?, r.u64()?);
        if deadline <= previous_deadline {
            return Err(format!(
                "snapshot section pending: deadline {deadline} of top-up {id} is not after the one ahead of it \
                 ({previous_deadline})"
            ));
        }
        previous_deadline = deadline;
        if state.topups.get(&id).is_some_and(|t| t.state == TopUpState::Pending && t.deadline == deadline) {
            queued += 1;
        }
        state.pending.push_back((deadline, id));
    }
    if queued != state.topups_pending {
        return Err(format!(
            "snapshot section pending: {} of the {} pending top-ups have no deadline queued",
            state.topups_pending - queued,
            state.topups_pending
        ));
    }

    let mut r = get(SECTION_HISTORY, "history")?;
    let count = r.b.len() / HISTORY_SIZE;
    if count as u64 > history_next {
        return Err("snapshot history holds more entries than were ever appended".into());
    }
    // Bounded as the idempotency records' count is: the ring's sequence numbers (and `prev`,
    // one more) never wrap as it goes on appending.
    if history_next > ID_SEQ_MAX {
        return Err(format!("snapshot section meta: {history_next} history entries appended is above 2^62"));
    }
    // The first retained entry's sequence number (the meta section's `history appended` is one
    // past the last).
    let first = history_next - count as u64;
    let mut entries = Vec::with_capacity(count);
    while !r.done() {
        let seq = first + entries.len() as u64;
        let prev = r.u64()?;
        // A back link names an older entry (`prev` is its sequence number + 1): a chain always
        // ends, whatever a read's filter skips.
        if prev > seq {
            return Err(format!("history entry {seq} links to a newer entry ({prev})"));
        }
        entries.push(HistoryEntry {
            prev,
            timestamp: r.u64()?,
            id: r.u64()?,
            counterparty: r.u64()?,
            amount: r.i64()?,
            balance_after: r.i64()?,
            detail: r.u64()?,
            status: r.u16()?,
            kind: r.u8()?,
        });
    }
    // A ring smaller than the snapshot's (`history_max` lowered between starts: it bounds only
    // what reads still see) keeps the newest entries; the links to the dropped ones lead
    // nowhere (`HistoryRing::get`).
    state.history = HistoryRing::restore(limits.history_max, history_next, entries);

    let mut r = get(SECTION_OUTBOX, "outbox")?;
    while !r.done() {
        let seq = r.u64()?;
        state.outbox.push_back((seq, r.command()?));
    }
    Ok(state)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn encoded_methods(methods: &Methods) -> Vec<u8> {
        encode_methods(methods.len(), methods.sorted(), W(Vec::new()))
    }

    #[test]
    fn varints_roundtrip_and_only_the_minimal_form_is_accepted() {
        let mut values = vec![0, 1, 0x7f, 0x80, 0x3fff, 0x4000, u64::MAX, u64::MAX - 1, 1 << 63];
        for bits in 1..64 {
            values.extend([(1u64 << bits) - 1, 1 << bits, (1 << bits) + 1]);
        }
        for &v in &values {
            let mut w = W(Vec::new());
            w.varint(v);
            // The reference encoding, byte by byte.
            let (mut expect, mut x) = (Vec::new(), v);
            while x >= 0x80 {
                expect.push(x as u8 | 0x80);
                x >>= 7;
            }
            expect.push(x as u8);
            assert_eq!(w.0, expect, "{v}");
            // Decoded alone (the short path near the end) and with bytes after it (word path).
            for tail in [&[][..], &[0u8; 12][..]] {
                let b = [&w.0[..], tail].concat();
                let mut r = R { b: &b, at: 0, section: "test" };
                assert_eq!(r.varint(), Ok(v), "{v} with {} bytes after", tail.len());
                assert_eq!(r.at, w.0.len());
            }
        }
        for bad in [&[0x80, 0x00][..], &[0xff, 0x80, 0x00], &[0x80; 11], &[0xff; 9], &[0x80, 0x80]] {
            for tail in [&[][..], &[0u8; 12][..]] {
                let b = [bad, tail].concat();
                assert!(R { b: &b, at: 0, section: "test" }.varint().is_err(), "{bad:?}");
            }
        }
        // Ten bytes whose last carries more than the 64th bit.
        let over = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(R { b: &over, at: 0, section: "test" }.varint().is_err());
    }

    #[test]
    fn the_example_in_the_format_doc() {
        let fresh = Account::new(1000, AccountKind::User, 1, 0);
        let funded = Account {
            balance: 640,
            spent_today: 10,
            history_head: 300,
            spent_day: 20419,
            methods: 1,
            ..Account::new(1001, AccountKind::User, 1, 0)
        };
        let mut encoder = AccountsEncoder::new(2, &mut SectionBuffers::default());
        encoder.push(&fresh);
        encoder.push(&funded);
        let [(_, ids), (_, records)] = encoder.finish();
        assert_eq!(ids, [2, 0, 0, 0, 0, 0, 0, 0, 0xd0, 0x0f, 0x02]);
        assert_eq!(records, [0x80, 1, 1, 0x75, 0x80, 0x0a, 0x0a, 0xac, 0x02, 0xc3, 0x9f, 0x01, 0x01]);
    }

    fn limits(accounts_max: u32) -> ShardLimits {
        ShardLimits { accounts_max, history_max: 16, ids_max: 16 }
    }

    fn find<'a>(sections: &'a [(u32, Vec<u8>)]) -> impl Fn(u32) -> Option<&'a [u8]> {
        |tag| sections.iter().find(|(t, _)| *t == tag).map(|(_, b)| b.as_slice())
    }

    /// A shard holding, after genesis, `n` accounts with every field drawn from its whole range
    /// (and many zero), and bindings with any user and method.
    fn random_state(n: u64, seed: u64) -> ShardState {
        let mut rng = crate::workload::SplitMix64(seed);
        let mut state = ShardState::new(0, 1, LedgerConfig::default(), limits(n as u32 + 64));
        let any = |rng: &mut crate::workload::SplitMix64| match rng.below(4) {
            0 => 0,
            1 => rng.below(300),
            2 => rng.next_u64() >> rng.below(64),
            _ => [u64::MAX, u64::MAX - 1, 1 << 63, (1 << 56) - 1, 1 << 56][rng.below(5) as usize],
        };
        let mut id = 1_000_000u64;
        for _ in 0..n {
            // Sequential, gapped, random and extreme ids; deltas of both signs.
            id = match rng.below(4) {
                0 => id.wrapping_add(1),
                1 => id.wrapping_add(1 + rng.below(5000)),
                2 => rng.next_u64() | 1,
                _ => [u64::MAX, 1 << 63, 2][rng.below(3) as usize],
            };
            if id == 0 || state.index.lookup(id).is_some() {
                continue;
            }
            let account = Account {
                id,
                balance: any(&mut rng) as i64,
                union: any(&mut rng),
                spent_today: any(&mut rng),
                daily_cap: any(&mut rng),
                history_head: any(&mut rng),
                spent_day: any(&mut rng) as u32,
                kind: AccountKind::from_code(1 + rng.below(9) as u16).unwrap(),
                flags: [0, 1, 3, 255][rng.below(4) as usize],
                methods: any(&mut rng) as u8,
            };
            let slot = state.index.insert(id).unwrap();
            state.index.publish(slot, account.balance);
            state.accounts.push(account);
            for _ in 0..rng.below(3) {
                let (user, method) = (if rng.below(2) == 0 { id } else { any(&mut rng) }, any(&mut rng));
                let channel = Channel::ALL[rng.below(4) as usize];
                if state.methods.get(user, method).is_none() {
                    state.methods.insert(user, method, channel);
                }
            }
        }
        state
    }

    #[test]
    fn accounts_and_methods_with_any_values_roundtrip() {
        for (n, seed) in [(0, 1), (1, 2), (50, 3), (3000, 4), (100_000, 5)] {
            let state = random_state(n, seed);
            let sections = encode(&state);
            let restored = decode(find(&sections), LedgerConfig::default(), state.limits.clone()).unwrap();
            assert_eq!(restored.accounts(), state.accounts(), "seed {seed}");
            assert_eq!(restored.methods, state.methods, "seed {seed}");
            assert_eq!(restored.index().len(), state.index().len());
            for (slot, a) in state.accounts().iter().enumerate() {
                assert_eq!(restored.index().lookup(a.id), Some(slot as u32));
                assert_eq!(restored.index().balance(a.id), Some(a.balance));
            }
            assert_eq!(encode(&restored), sections, "the same state gives the same bytes");
        }
    }

    #[test]
    fn encoding_as_the_worker_does_gives_the_same_bytes_and_bindings() {
        // Buffers larger and smaller than the sections, and none for some.
        let mut states = [random_state(3000, 7), random_state(50, 8), random_state(20_000, 9), random_state(0, 10)];
        let mut buffers = SectionBuffers::default();
        for state in &mut states {
            let (plain, before) = (encode(state), state.methods.clone());
            let (sections, replaced) = encode_compacting(state, buffers);
            assert_eq!(sections, plain);
            // The bindings (random_state makes them all after the load) are now compacted.
            assert_eq!(replaced.is_some(), !before.is_empty());
            assert!(!state.methods.worth_compacting());
            assert_eq!(state.methods, before);
            assert_eq!(encode(state), plain);
            buffers = SectionBuffers::new(sections);
        }
        let mut partial = encode(&states[2]);
        partial.retain(|(tag, _)| *tag != SECTION_ACCOUNTS && *tag != SECTION_METHODS);
        assert_eq!(encode_compacting(&mut states[0], SectionBuffers::new(partial)).0, encode(&states[0]));
    }

    #[test]
    fn a_snapshot_without_the_system_accounts_first_is_refused() {
        let mut state = random_state(10, 6);
        state.accounts.swap(0, 12);
        let sections = encode(&state);
        let error = decode(find(&sections), LedgerConfig::default(), state.limits.clone()).err().unwrap();
        assert!(error.contains("system account"), "{error}");
    }

    #[test]
    fn methods_bound_after_a_load_encode_like_methods_bound_without_one() {
        // A third of the bindings go through a snapshot, the rest are bound after the load (before,
        // between and after the loaded ones): the result encodes exactly like the original.
        let state = random_state(20_000, 6);
        let all: Vec<_> = state.methods.sorted().collect();
        assert!(all.len() > 10_000, "{}", all.len());
        let mut first = Methods::default();
        for &((user, method), channel) in all.iter().step_by(3) {
            first.insert(user, method, channel);
        }
        let mut restored = decode_methods(&encoded_methods(&first)).unwrap();
        assert_eq!(restored, first);
        for (i, &((user, method), channel)) in all.iter().enumerate() {
            if i % 3 != 0 {
                assert_eq!(restored.get(user, method), None);
                restored.insert(user, method, channel);
            }
        }
        assert_eq!(restored, state.methods);
        let bytes = encoded_methods(&state.methods);
        assert_eq!(encoded_methods(&restored), bytes);
        assert_eq!(encoded_methods(&decode_methods(&bytes).unwrap()), bytes);
    }

    #[test]
    fn methods_must_be_ascending_and_unique() {
        let section = |bindings: &[(u64, u64)]| {
            let mut w = W(Vec::new());
            w.u64(bindings.len() as u64);
            for &(user_delta, method) in bindings {
                w.varint(user_delta);
                w.varint(method);
                w.u8(Channel::Wechat as u8);
            }
            w.0
        };
        let methods = decode_methods(&section(&[(5, 1), (0, 2), (1, 0)])).unwrap();
        assert_eq!(methods.get(5, 2), Some(Channel::Wechat));
        assert_eq!(methods.get(6, 0), Some(Channel::Wechat));
        assert_eq!(methods.get(6, 1), None);
        for bad in [&[(5, 1), (0, 1)][..], &[(5, 2), (0, 1)]] {
            let err = decode_methods(&section(bad)).unwrap_err();
            assert!(err.contains("not in ascending order"), "{err}");
        }
    }

    fn decode_with(sections: &[(u32, Vec<u8>)], tag: u32, section: Vec<u8>, accounts_max: u32) -> Result<(), String> {
        let mut sections = sections.to_vec();
        sections.iter_mut().find(|(t, _)| *t == tag).unwrap().1 = section;
        decode(find(&sections), LedgerConfig::default(), limits(accounts_max)).map(|_| ())
    }

    #[test]
    fn damaged_account_sections_are_errors_not_panics() {
        let state = random_state(300, 7);
        let sections = encode(&state);
        let accounts_max = state.limits.accounts_max;
        for tag in [SECTION_ACCOUNT_IDS, SECTION_ACCOUNTS, SECTION_METHODS] {
            let pristine = find(&sections)(tag).unwrap().to_vec();
            for cut in (0..pristine.len()).step_by(7) {
                let err = decode_with(&sections, tag, pristine[..cut].to_vec(), accounts_max);
                assert!(err.is_err(), "section {tag} cut at {cut}");
            }
            let mut longer = pristine.clone();
            longer.push(0);
            assert!(decode_with(&sections, tag, longer, accounts_max).is_err(), "section {tag} with a byte more");
            for at in 0..pristine.len() {
                for bit in [0x01, 0x80] {
                    let mut damaged = pristine.clone();
                    damaged[at] ^= bit;
                    // Some flips still decode (another balance, say): only panics are failures.
                    let _ = decode_with(&sections, tag, damaged, accounts_max);
                }
            }
        }
    }

    #[test]
    fn account_ids_must_be_unique_non_zero_and_within_capacity() {
        let state = random_state(10, 8);
        let sections = encode(&state);
        let ids = |list: &[u64]| {
            let mut w = W(Vec::new());
            w.u64(list.len() as u64);
            let mut previous = 0u64;
            for &id in list {
                w.varint(zigzag(id.wrapping_sub(previous) as i64));
                previous = id;
            }
            w.0
        };
        let mut list: Vec<u64> = state.accounts().iter().map(|a| a.id).collect();
        let n = list.len();
        assert_eq!(decode_with(&sections, SECTION_ACCOUNT_IDS, ids(&list), 1000), Ok(()));
        list[n - 1] = list[2];
        let err = decode_with(&sections, SECTION_ACCOUNT_IDS, ids(&list), 1000).unwrap_err();
        assert!(err.contains("duplicate") && err.contains(&format!("position {}", n - 1)), "{err}");
        list[n - 1] = 0;
        assert!(decode_with(&sections, SECTION_ACCOUNT_IDS, ids(&list), 1000).unwrap_err().contains("id 0"));
        let err = decode_with(&sections, SECTION_ACCOUNTS, find(&sections)(SECTION_ACCOUNTS).unwrap().to_vec(), 10);
        assert!(err.unwrap_err().contains("more than accounts_max"));
    }

    #[test]
    fn top_ups_keep_their_method_and_a_snapshot_without_the_methods_section_still_loads() {
        let mut state = ShardState::new(0, 1, LedgerConfig::default(), limits(64));
        let mut ts = 1_795_752_000_000_000_000u64;
        let mut run = |state: &mut ShardState, c: Command| {
            ts += 1_000_000_000;
            state.apply(ts, &c).0
        };
        run(&mut state, Command::CreateAccount { account: 5, kind: AccountKind::User, flags: 1, union: 0 });
        for method in [1, 2] {
            run(&mut state, Command::BindMethod { user: 5, method, channel: Channel::Alipay });
        }
        let begin = Command::TopUpBegin { id: 900, user: 5, method: 1, fen: 600 };
        assert_eq!(run(&mut state, begin).status, Status::Ok);
        // Push the begin's id record out of the 16-id window: the top-up is held.
        for id in 0..20 {
            let other = Command::TopUpBegin { id: 1000 + id, user: 5, method: 2, fen: 600 };
            assert_eq!(run(&mut state, other).status, Status::Ok);
        }
        assert!(state.id_record(900).is_none());
        assert_eq!(state.lookup(900).map(|r| r.command), Some(begin));

        let sections = encode(&state);
        let restored = decode(find(&sections), LedgerConfig::default(), limits(64)).unwrap();
        assert_eq!(restored.lookup(900), state.lookup(900));
        assert_eq!(encode(&restored), sections, "one state, one encoding");

        // Written before top-ups kept their method: no section 10. It loads; the method is
        // unknown, so the lookup does not guess one, and a retried begin is compared by channel.
        let older: Vec<_> = sections.iter().filter(|(t, _)| *t != SECTION_TOPUP_METHODS).cloned().collect();
        let mut restored = decode(find(&older), LedgerConfig::default(), limits(64)).unwrap();
        assert_eq!(restored.topup(900).map(|t| t.method), Some(None));
        assert!(restored.lookup(900).is_none());
        assert!(restored.apply(ts + 1, &begin).0.duplicate);

        // A damaged methods section is an error: a truncated one, one byte longer, a bad flag.
        let methods = find(&sections)(SECTION_TOPUP_METHODS).unwrap().to_vec();
        let mut bad_flag = methods.clone();
        bad_flag[0] = 2;
        for damaged in [methods[..methods.len() - 1].to_vec(), [&methods[..], &[0]].concat(), bad_flag] {
            assert!(decode_with(&sections, SECTION_TOPUP_METHODS, damaged, 64).is_err());
        }

        // A top-up marked as held outside the window whose begin is still in the window (the
        // id of the 20th begin above) is a damaged snapshot, refused rather than loaded with
        // one of the two forgotten.
        assert!(state.id_record(1019).is_some());
        state.topups.get_mut(&1019).unwrap().id_evicted = true;
        let err = decode(find(&encode(&state)), LedgerConfig::default(), limits(64)).err().unwrap();
        assert!(err.contains("both in and outside the idempotency window"), "{err}");
    }

    /// A shard whose user 5 topped up `n` times (history entries: the credits and debits).
    fn topped_up(n: u64, limits: ShardLimits) -> ShardState {
        let mut state = ShardState::new(0, 1, LedgerConfig::default(), limits);
        let ts = 1_795_752_000_000_000_000u64;
        state.apply(ts, &Command::CreateAccount { account: 5, kind: AccountKind::User, flags: 1, union: 0 });
        state.apply(ts + 1, &Command::BindMethod { user: 5, method: 1, channel: Channel::Alipay });
        for id in 1..=n {
            let begin = Command::TopUpBegin { id, user: 5, method: 1, fen: 600 };
            assert_eq!(state.apply(ts + 2 * id, &begin).0.status, Status::Ok);
            let confirm =
                Command::TopUpConfirm { id, fen: 600, channel_txn: [b'x'; crate::layout::TEXT_LEN], paid_by: 0 };
            assert_eq!(state.apply(ts + 2 * id + 1, &confirm).0.status, Status::Ok);
        }
        state
    }

    #[test]
    fn a_history_longer_than_the_ring_keeps_its_newest_entries_and_links_only_point_back() {
        // `history_max` may be lowered between starts: the oldest entries are dropped.
        let large = ShardLimits { accounts_max: 64, history_max: 1024, ids_max: 64 };
        let small = ShardLimits { history_max: 16, ..large.clone() };
        let state = topped_up(12, large);
        let sections = encode(&state);
        let history = find(&sections)(SECTION_HISTORY).unwrap().to_vec();
        let count = history.len() / HISTORY_SIZE;
        assert!(count > 16, "{count} entries, more than the smaller ring holds");
        let restored = decode(find(&sections), LedgerConfig::default(), small.clone()).unwrap();
        assert_eq!(restored.history.capacity(), 16);
        let newest: Vec<_> = state.history(5, 100, None);
        assert!(newest.len() > 1);
        let kept = restored.history(5, 100, None);
        assert!(!kept.is_empty() && kept.len() < newest.len(), "{} of {}", kept.len(), newest.len());
        assert_eq!(kept[..], newest[..kept.len()], "the newest ones");
        // A back link to the entry itself or a newer one is damage (a read could loop on it).
        for prev in [count as u64, count as u64 + 5] {
            let mut damaged = history.clone();
            let last = (count - 1) * HISTORY_SIZE;
            damaged[last..last + 8].copy_from_slice(&prev.to_le_bytes());
            let mut sections = sections.clone();
            sections.iter_mut().find(|(t, _)| *t == SECTION_HISTORY).unwrap().1 = damaged;
            let err = decode(find(&sections), LedgerConfig::default(), small.clone()).err().unwrap();
            assert!(err.contains("links to a newer entry"), "{err}");
        }
    }

    /// `sections` with `tag`'s bytes changed by `f`, decoded: the error.
    fn decode_changed(
        sections: &[(u32, Vec<u8>)],
        tag: u32,
        limits: &ShardLimits,
        f: impl FnOnce(&mut Vec<u8>),
    ) -> String {
        let mut sections = sections.to_vec();
        f(&mut sections.iter_mut().find(|(t, _)| *t == tag).unwrap().1);
        decode(find(&sections), LedgerConfig::default(), limits.clone()).err().expect("refused")
    }

    #[test]
    fn a_history_count_near_the_end_of_its_range_is_damage() {
        let limits = ShardLimits { accounts_max: 64, history_max: 1024, ids_max: 64 };
        let sections = encode(&topped_up(3, limits.clone()));
        // The meta section: shard u16, shards u16, last timestamp, id_seq, replica_out, then the
        // history entries appended (u64 at 28), which the next append would take past u64::MAX.
        let err = decode_changed(&sections, SECTION_META, &limits, |b| {
            b[28..36].copy_from_slice(&(u64::MAX - 1).to_le_bytes())
        });
        assert!(err.contains("above 2^62"), "{err}");
    }

    #[test]
    fn top_ups_and_their_deadlines_must_be_in_order_and_complete() {
        // Top-ups 1..=3 confirmed, 4..=6 pending (one deadline each, in order).
        let limits = ShardLimits { accounts_max: 64, history_max: 1024, ids_max: 64 };
        let mut state = topped_up(3, limits.clone());
        for id in 4..=6 {
            let begin = Command::TopUpBegin { id, user: 5, method: 1, fen: 600 };
            assert_eq!(state.apply(1_795_752_100_000_000_000 + id, &begin).0.status, Status::Ok);
        }
        let sections = encode(&state);
        assert!(decode(find(&sections), LedgerConfig::default(), limits.clone()).is_ok());
        let set_id = |bytes: &mut Vec<u8>, index: usize, id: u64| {
            // 96 bytes a record (docs/wal-format.md), the id first.
            bytes[index * 96..index * 96 + 8].copy_from_slice(&id.to_le_bytes())
        };
        // Id 0 (which the store refuses with a panic), a duplicate, and two out of order.
        let err = decode_changed(&sections, SECTION_TOPUPS, &limits, |b| set_id(b, 0, 0));
        assert!(err.contains("top-up id 0 does not follow 0"), "{err}");
        let err = decode_changed(&sections, SECTION_TOPUPS, &limits, |b| set_id(b, 1, 1));
        assert!(err.contains("top-up id 1 does not follow 1"), "{err}");
        let err = decode_changed(&sections, SECTION_TOPUPS, &limits, |b| {
            set_id(b, 0, 2);
            set_id(b, 1, 1);
        });
        assert!(err.contains("top-up id 1 does not follow 2"), "{err}");
        // The deadlines: out of order, or one pending top-up's missing.
        let err = decode_changed(&sections, SECTION_PENDING, &limits, |b| {
            let (first, rest) = b.split_at_mut(16);
            first.swap_with_slice(&mut rest[..16]);
        });
        assert!(err.contains("is not after the one ahead of it"), "{err}");
        let err = decode_changed(&sections, SECTION_PENDING, &limits, |b| {
            let deadline = b[..8].to_vec();
            b[16..24].copy_from_slice(&deadline);
        });
        assert!(err.contains("is not after the one ahead of it"), "two equal: {err}");
        let err = decode_changed(&sections, SECTION_PENDING, &limits, |b| b.truncate(b.len() - 16));
        assert!(err.contains("1 of the 3 pending top-ups have no deadline queued"), "{err}");
        // The entry of a top-up that ended before its deadline stays until then (as those of 1..=3).
        let fail = Command::TopUpFail { id: 5, reason: FailReason::Declined };
        assert_eq!(state.apply(1_795_752_100_000_000_100, &fail).0.status, Status::Ok);
        assert_eq!(state.pending.len(), 6, "the entries of ended top-ups wait for their deadlines");
        assert!(decode(find(&encode(&state)), LedgerConfig::default(), limits.clone()).is_ok());
    }

    #[test]
    fn idempotency_records_are_numbered_up_to_the_meta_sequence() {
        let limits = ShardLimits { accounts_max: 64, history_max: 1024, ids_max: 64 };
        let sections = encode(&topped_up(3, limits.clone()));
        let err = decode_changed(&sections, SECTION_IDS, &limits, |b| b[0] ^= 1);
        assert!(err.contains("record 0 has sequence number"), "{err}");
        // The meta's id_seq: 12 bytes in (shard, shards, last_timestamp first).
        for id_seq in [u64::MAX, u64::MAX - 1, 1 << 63, 2] {
            let err =
                decode_changed(&sections, SECTION_META, &limits, |b| b[12..20].copy_from_slice(&id_seq.to_le_bytes()));
            assert!(err.contains(&format!("id_seq {id_seq} does not fit")), "{err}");
        }
    }

    #[test]
    fn more_top_ups_held_outside_the_window_than_the_limits_allow_are_refused() {
        // A shard with one real top-up, then `n` ended copies of it marked as held outside the
        // window, encoded.
        let held = |n: usize| {
            let mut state = ShardState::new(0, 1, LedgerConfig::default(), limits(64));
            let ts = 1_795_752_000_000_000_000u64;
            state.apply(ts, &Command::CreateAccount { account: 5, kind: AccountKind::User, flags: 1, union: 0 });
            state.apply(ts + 1, &Command::BindMethod { user: 5, method: 1, channel: Channel::Alipay });
            let begin = Command::TopUpBegin { id: 1, user: 5, method: 1, fen: 600 };
            assert_eq!(state.apply(ts + 2, &begin).0.status, Status::Ok);
            let template = *state.topup(1).unwrap();
            for id in 0..n as u64 {
                let topup = TopUp { state: TopUpState::Failed, id_evicted: true, ..template };
                state.topups.insert(1_000_000 + id, topup);
            }
            encode(&state)
        };
        // As many as the limits allow (pending plus kept, twice `topups_max`) load; one more is
        // more than a shard ever holds, so the file is damaged.
        let allowed = crate::ledger::state_machine::held_topup_ids_max(&limits(64));
        assert!(decode(find(&held(allowed)), LedgerConfig::default(), limits(64)).is_ok());
        let err = decode(find(&held(allowed + 1)), LedgerConfig::default(), limits(64)).err().unwrap();
        assert!(err.contains("more top-ups outside the idempotency window than ids_max allows"), "{err}");
    }
}
