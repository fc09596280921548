//! The event feed: committed money events, per shard, in commit order, resumable by position.
//!
//! Producing: the shard worker applies every command of a batch through `BatchEvents::apply`,
//! which calls `ShardState::apply` and, for the outcomes worth notifying (see `event_kind`),
//! records one `EventRecord`. After the batch (durable and applied), `ShardFeed::publish` pushes
//! its events into the shard's bounded ring under one short write lock and bumps one watch
//! counter: O(1) per event, no per-subscriber work and no waiting on the shard thread. Recovery
//! (`node::load_shard_with_feed`) replays the log after the snapshot through the same function,
//! so events after the snapshot survive a restart with the same positions; the snapshot itself
//! keeps the shard's newest `FEED_EVENTS_IN_SNAPSHOT` events before it (`encode_tail`), which
//! recovery puts back first (`restore`).
//!
//! Position: `(lsn, index)` = the log position of the batch that committed the command and the
//! command's index in it. It only grows on a shard, also across restarts (lsns persist). In the
//! in-memory mode (no log) a per-process batch counter stands in for the lsn.
//! A cursor is one position per shard, printed `0:123.4,1:98.0` (shard:lsn.index). There is no
//! total order across shards: the feed interleaves shards, each in its own commit order.
//!
//! Consuming: `ShardFeed::read_after` copies the events after a position out of the ring under a
//! read lock. A position older than the ring (evicted, or more than `FEED_EVENTS_IN_SNAPSHOT`
//! events before the snapshot a restart began from) is refused (`TooOld`): the subscriber must
//! resync from balances.
//!
//! What must never happen here: blocking the shard thread on a subscriber, publishing anything
//! before its batch is durable, or an event for a rejected or duplicate (retried) command.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::watch;
use zerocopy::{FromBytes, IntoBytes};

use crate::layout::{EventRecord, WatchRecord};
use crate::ledger::state_machine::{Fanout, Reply, TopUp};
use crate::ledger::{Command, ShardState, Status};

/// Default number of events each shard's ring keeps (96 B each: 96 MiB per shard when full).
pub const FEED_EVENTS_MAX_DEFAULT: usize = 1 << 20;

/// How many of a shard's newest events its snapshots keep (96 B each: 6 MiB), so that after a
/// restart from a snapshot a subscriber that was at most this many events behind when the
/// snapshot was taken resumes where it was (`ShardFeed::encode_tail`, `restore`).
pub const FEED_EVENTS_IN_SNAPSHOT: usize = 1 << 16;

/// Bytes before the events in a feed tail section.
const TAIL_HEADER: usize = 24;

/// Event kind codes (`EventRecord::kind`). Stable.
pub mod event_kind {
    /// A top-up was confirmed: account = user, amount = fen, streamer_share = coins credited,
    /// detail = channel code.
    pub const TOPUP_SUCCEEDED: u8 = 1;
    /// The channel reported a failure: account = user, amount = fen, detail = reason code.
    pub const TOPUP_FAILED: u8 = 2;
    /// A confirmation arrived for a failed/expired top-up; the money went back to the channel:
    /// account = user, amount = fen, detail = channel code.
    pub const TOPUP_REFUNDED: u8 = 3;
    /// A tip: account = payer, counterparty = streamer, union, amount = coins, and the split.
    pub const TIP: u8 = 4;
    /// A gift: as a tip, detail = gift id.
    pub const GIFT: u8 = 5;
    /// An event payment: as a tip, detail = event id.
    pub const EVENT_PAYMENT: u8 = 6;
    /// One shard's part of a settlement: account = the settled account, amount = coins swept on
    /// this shard (one event per shard; the settlement's total is the sum of the parts by id).
    pub const SETTLE: u8 = 7;

    /// A stable snake_case name.
    pub fn name(kind: u8) -> &'static str {
        match kind {
            TOPUP_SUCCEEDED => "topup_succeeded",
            TOPUP_FAILED => "topup_failed",
            TOPUP_REFUNDED => "topup_refunded",
            TIP => "tip",
            GIFT => "gift",
            EVENT_PAYMENT => "event_payment",
            SETTLE => "settle",
            _ => "unknown",
        }
    }
}

/// Watch modes (`WatchRecord::mode`).
pub mod watch_mode {
    /// Events strictly after (lsn, index).
    pub const AFTER: u8 = 1;
    /// Only events committed from now on.
    pub const TAIL: u8 = 2;
    /// Every event the shard still retains.
    pub const EARLIEST: u8 = 3;
}

/// `WatchRecord::shard` meaning "every shard not listed".
pub const ALL_SHARDS: u16 = 0xFFFF;

/// A position on one shard: (batch lsn, index in batch). Ordered.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default, Hash)]
pub struct Position {
    pub lsn: u64,
    pub index: u32,
}

impl Position {
    pub const fn new(lsn: u64, index: u32) -> Position {
        Position { lsn, index }
    }

    /// The position of an event.
    pub fn of(event: &EventRecord) -> Position {
        Position { lsn: event.lsn.get(), index: event.index.get() }
    }
}

impl core::fmt::Display for Position {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}", self.lsn, self.index)
    }
}

/// One position per shard: where a subscriber is. Printed `0:123.4,1:98.0`.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Cursor(pub Vec<(u16, Position)>);

impl Cursor {
    /// The position of `shard`, if the cursor has one.
    pub fn get(&self, shard: u16) -> Option<Position> {
        self.0.iter().find(|(s, _)| *s == shard).map(|(_, p)| *p)
    }

    /// Moves `shard` to `position` (adds the shard if absent).
    pub fn set(&mut self, shard: u16, position: Position) {
        match self.0.iter_mut().find(|(s, _)| *s == shard) {
            Some(entry) => entry.1 = position,
            None => {
                self.0.push((shard, position));
                self.0.sort_by_key(|(s, _)| *s);
            }
        }
    }

    /// Advances past `event` (its shard's position becomes the event's).
    pub fn advance(&mut self, event: &EventRecord) {
        self.set(event.shard.get(), Position::of(event));
    }

    /// The watch records that resume after this cursor.
    pub fn to_records(&self) -> Vec<WatchRecord> {
        self.0.iter().map(|(s, p)| watch_record(*s, watch_mode::AFTER, *p)).collect()
    }

    /// The cursor a server acknowledgement carries (mode AFTER records).
    pub fn from_records(records: &[WatchRecord]) -> Cursor {
        let mut cursor = Cursor::default();
        for r in records.iter().filter(|r| r.mode == watch_mode::AFTER && r.shard.get() != ALL_SHARDS) {
            cursor.set(r.shard.get(), Position::new(r.lsn.get(), r.index.get()));
        }
        cursor
    }
}

impl core::fmt::Display for Cursor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, (shard, position)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{shard}:{position}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Cursor {
    type Err = String;
    fn from_str(s: &str) -> Result<Cursor, String> {
        let bad = || format!("invalid position {s:?} (expected SHARD:LSN.INDEX[,SHARD:LSN.INDEX...])");
        let mut cursor = Cursor::default();
        for part in s.split(',') {
            let (shard, position) = part.trim().split_once(':').ok_or_else(bad)?;
            let (lsn, index) = position.split_once('.').ok_or_else(bad)?;
            let shard: u16 = shard.parse().map_err(|_| bad())?;
            if shard >= crate::engine::SHARDS_MAX {
                return Err(format!(
                    "invalid position {s:?}: shard {shard} (a server has at most {} shards)",
                    crate::engine::SHARDS_MAX
                ));
            }
            if cursor.get(shard).is_some() {
                return Err(bad());
            }
            let position = Position::new(lsn.parse().map_err(|_| bad())?, index.parse().map_err(|_| bad())?);
            cursor.set(shard, position);
        }
        Ok(cursor)
    }
}

/// Builds a watch record.
pub fn watch_record(shard: u16, mode: u8, position: Position) -> WatchRecord {
    let mut r = WatchRecord { shard: shard.into(), mode, ..WatchRecord::default() };
    r.lsn.set(position.lsn);
    r.index.set(position.index);
    r
}

/// The events of one batch, gathered while it is applied.
#[derive(Default)]
pub struct BatchEvents {
    lsn: u64,
    events: Vec<EventRecord>,
}

impl BatchEvents {
    /// Events of the batch logged at `lsn` (0 when there is no log).
    pub fn new(lsn: u64) -> BatchEvents {
        BatchEvents { lsn, events: Vec::new() }
    }

    /// Starts the next batch, at `lsn`, in the same buffer (a batch has up to a few thousand
    /// events: a fresh vector would regrow to that, copying, every batch).
    pub fn restart(&mut self, lsn: u64) {
        self.lsn = lsn;
        self.events.clear();
    }

    /// Applies `command` (the `index`-th of the batch) and records its event, if it has one.
    pub fn apply(
        &mut self,
        state: &mut ShardState,
        index: usize,
        timestamp: u64,
        command: &Command,
    ) -> (Reply, Fanout) {
        let topup = match command {
            Command::TopUpConfirm { id, .. } | Command::TopUpFail { id, .. } => state.topup(*id).copied(),
            _ => None,
        };
        let (reply, fanout) = state.apply(timestamp, command);
        if !reply.duplicate {
            if let Some(mut event) = event_of(state, topup.as_ref(), command, &reply) {
                event.shard.set(state.shard());
                event.index.set(index as u32);
                event.timestamp.set(timestamp);
                self.events.push(event);
            }
        }
        (reply, fanout)
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// The event of an applied, non-duplicate command, if it is one worth notifying.
fn event_of(state: &ShardState, topup: Option<&TopUp>, command: &Command, reply: &Reply) -> Option<EventRecord> {
    let mut e = EventRecord::default();
    match (*command, reply.status) {
        (Command::TopUpConfirm { id, fen, .. }, Status::Ok) => {
            let topup = topup?;
            e.kind = event_kind::TOPUP_SUCCEEDED;
            e.id.set(id);
            e.account.set(topup.user);
            e.amount.set(fen);
            e.streamer_share.set(reply.value.max(0) as u64);
            e.detail.set(topup.channel as u64);
        }
        (Command::TopUpConfirm { id, fen, .. }, Status::TopUpRefunded) => {
            let topup = topup?;
            e.kind = event_kind::TOPUP_REFUNDED;
            e.id.set(id);
            e.account.set(topup.user);
            e.amount.set(fen);
            e.detail.set(topup.channel as u64);
        }
        (Command::TopUpFail { id, reason }, Status::Ok) => {
            let topup = topup?;
            e.kind = event_kind::TOPUP_FAILED;
            e.id.set(id);
            e.account.set(topup.user);
            e.amount.set(topup.fen);
            e.detail.set(reason as u64);
        }
        (Command::Tip { id, from, to, coins }, Status::Ok) => {
            spend(state, &mut e, event_kind::TIP, id, from, to, coins, 0)
        }
        (Command::Gift { id, from, to, gift, .. }, Status::Ok) => {
            spend(state, &mut e, event_kind::GIFT, id, from, to, reply.value2.max(0) as u64, gift)
        }
        (Command::PayEvent { id, from, to, event, coins }, Status::Ok) => {
            spend(state, &mut e, event_kind::EVENT_PAYMENT, id, from, to, coins, event)
        }
        (Command::Settle { id, account } | Command::ReplicaSettle { id, account, .. }, Status::Ok) => {
            e.kind = event_kind::SETTLE;
            e.id.set(id);
            e.account.set(account);
            e.amount.set(reply.value.max(0) as u64);
        }
        _ => return None,
    }
    Some(e)
}

#[allow(clippy::too_many_arguments)]
fn spend(state: &ShardState, e: &mut EventRecord, kind: u8, id: u64, from: u64, to: u64, coins: u64, detail: u64) {
    let union = state.account(to).map_or(0, |a| a.union);
    let [streamer, union_share, platform] = state.spend_split(coins, union != 0);
    e.kind = kind;
    e.id.set(id);
    e.account.set(from);
    e.counterparty.set(to);
    e.union.set(union);
    e.amount.set(coins);
    e.streamer_share.set(streamer);
    e.union_share.set(union_share);
    e.platform_share.set(platform);
    e.detail.set(detail);
}

struct Ring {
    events: VecDeque<EventRecord>,
    /// Everything at or before this position is gone (evicted, or before the recovery snapshot).
    floor: Position,
    /// The newest published position (or the floor when nothing was published).
    last: Position,
}

/// A position older than what the shard retains.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TooOld {
    pub shard: u16,
    /// Positions at or before this one are gone.
    pub floor: Position,
}

impl core::fmt::Display for TooOld {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "shard {} retains only events after {}:{}", self.shard, self.shard, self.floor)
    }
}

/// One shard's bounded ring of recent events.
pub struct ShardFeed {
    shard: u16,
    capacity: usize,
    ring: RwLock<Ring>,
    changed: Arc<watch::Sender<u64>>,
}

impl ShardFeed {
    /// Publishes the events of one durable, applied batch. Called by the shard's writer only.
    pub fn publish(&self, batch: &mut BatchEvents) {
        if batch.events.is_empty() {
            return;
        }
        {
            let mut ring = self.ring.write();
            // Without a log (lsn 0), a batch counter stands in for the lsn.
            let lsn = if batch.lsn > ring.last.lsn { batch.lsn } else { ring.last.lsn + 1 };
            // In bulk: drop what the batch pushes out of the ring, then append the batch (its
            // tail only, if it alone is larger than the ring).
            let events = &mut batch.events;
            let skip = events.len().saturating_sub(self.capacity);
            let overflow = (ring.events.len() + events.len() - skip).saturating_sub(self.capacity);
            let mut dropped_last = ring.events.drain(..overflow).next_back();
            if skip > 0 {
                let mut last = events[skip - 1];
                last.lsn.set(lsn);
                dropped_last = Some(last);
            }
            if let Some(old) = dropped_last {
                ring.floor = Position::of(&old);
            }
            ring.events.extend(events.drain(..).skip(skip).map(|mut event| {
                event.lsn.set(lsn);
                event
            }));
            ring.last = ring.events.back().map_or(ring.last, Position::of);
        }
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Marks everything up to and including batch `lsn` as not retained (recovery starts after a
    /// snapshot at `lsn`: the events before it are unknown).
    pub fn start_after(&self, lsn: u64) {
        let mut ring = self.ring.write();
        ring.events.clear();
        // Lsn 0 is genesis: nothing came before it.
        ring.floor = if lsn == 0 { Position::default() } else { Position::new(lsn, u32::MAX) };
        ring.last = ring.floor;
    }

    /// The newest `max` retained events as a snapshot section, into `out` (its contents are
    /// dropped; its memory is reused). The layout (`docs/wal-format.md`, tag 11): floor lsn u64,
    /// floor index u32, zero u32, count u64, then `count` 96-byte `EventRecord`s, oldest first.
    /// The floor is the position of the newest event left out, or the ring's floor if none is:
    /// every event after it is in the section.
    pub fn encode_tail(&self, max: usize, mut out: Vec<u8>) -> Vec<u8> {
        let ring = self.ring.read();
        let skip = ring.events.len().saturating_sub(max);
        let floor = if skip > 0 { Position::of(&ring.events[skip - 1]) } else { ring.floor };
        let count = ring.events.len() - skip;
        out.clear();
        out.reserve(TAIL_HEADER + count * core::mem::size_of::<EventRecord>());
        out.extend_from_slice(&floor.lsn.to_le_bytes());
        out.extend_from_slice(&floor.index.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(count as u64).to_le_bytes());
        let (front, back) = ring.events.as_slices();
        let (front, back) = if skip <= front.len() {
            (&front[skip..], back)
        } else {
            (&front[front.len()..], &back[skip - front.len()..])
        };
        out.extend_from_slice(front.as_bytes());
        out.extend_from_slice(back.as_bytes());
        out
    }

    /// Recovery from a snapshot at batch `lsn` that has a feed tail section (`encode_tail`):
    /// `start_after(lsn)`, but the events of the section stay retained (the newest `capacity`
    /// of them), so a subscriber that was behind when the snapshot was taken resumes after the
    /// restart without `position_too_old`. Nothing changes if the section is malformed.
    pub fn restore(&self, lsn: u64, section: &[u8]) -> Result<(), String> {
        let bad = |what: &str| Err(format!("snapshot section feed tail: {what}"));
        let Some((header, body)) = section.split_at_checked(TAIL_HEADER) else { return bad("truncated header") };
        let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        let mut floor = Position::new(word(0), (word(8) & 0xFFFF_FFFF) as u32);
        if word(8) >> 32 != 0 {
            return bad("non-zero reserved field");
        }
        let Ok(events) = <[EventRecord]>::ref_from_bytes(body) else { return bad("length is not whole events") };
        if events.len() as u64 != word(16) {
            return bad("event count does not match the length");
        }
        let covered = Position::new(lsn, u32::MAX);
        if floor > covered {
            return bad("floor after the snapshot's position");
        }
        let mut previous = floor;
        for event in events {
            let position = Position::of(event);
            if event.shard.get() != self.shard || position <= previous || position > covered {
                return bad(&format!("event at {position} out of order or of another shard"));
            }
            previous = position;
        }
        let skip = events.len().saturating_sub(self.capacity);
        if skip > 0 {
            floor = Position::of(&events[skip - 1]);
        }
        let mut ring = self.ring.write();
        ring.events.clear();
        ring.events.extend(events[skip..].iter().copied());
        ring.floor = floor;
        ring.last = ring.events.back().map_or(floor, Position::of);
        Ok(())
    }

    pub fn shard(&self) -> u16 {
        self.shard
    }

    /// The newest published position (the floor if nothing was published).
    pub fn last(&self) -> Position {
        self.ring.read().last
    }

    /// Positions at or before this one are no longer retained.
    pub fn floor(&self) -> Position {
        self.ring.read().floor
    }

    /// Events retained now.
    pub fn len(&self) -> usize {
        self.ring.read().events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends to `out` up to `max` events strictly after `after`, oldest first; returns the
    /// number copied. `TooOld` if events after `after` may have been evicted.
    pub fn read_after(&self, after: Position, max: usize, out: &mut Vec<EventRecord>) -> Result<usize, TooOld> {
        let ring = self.ring.read();
        if after < ring.floor {
            return Err(TooOld { shard: self.shard, floor: ring.floor });
        }
        let start = ring.events.partition_point(|e| Position::of(e) <= after);
        let n = (ring.events.len() - start).min(max);
        out.extend(ring.events.range(start..start + n).copied());
        Ok(n)
    }
}

/// The feeds of every shard of one engine, and the counter subscribers wait on.
pub struct Feed {
    shards: Vec<Arc<ShardFeed>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Feed {
    /// Empty rings of `capacity` events for `shards` shards.
    pub fn new(shards: u16, capacity: usize) -> Feed {
        let changed = Arc::new(watch::Sender::new(0));
        let shards = (0..shards)
            .map(|shard| {
                Arc::new(ShardFeed {
                    shard,
                    capacity: capacity.max(1),
                    ring: RwLock::new(Ring {
                        // Reserved, not touched: pages become resident as events arrive, and the
                        // ring never regrows (a doubling copied up to 48 MiB, on the shard
                        // thread and under the write lock that every reader waits on).
                        events: VecDeque::from(crate::mem::huge_vec(capacity.max(1))),
                        floor: Position::default(),
                        last: Position::default(),
                    }),
                    changed: changed.clone(),
                })
            })
            .collect();
        Feed { shards, changed }
    }

    pub fn shard(&self, shard: u16) -> &Arc<ShardFeed> {
        &self.shards[shard as usize]
    }

    pub fn shards(&self) -> &[Arc<ShardFeed>] {
        &self.shards
    }

    /// A receiver that sees a change after every publish.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Resolves a watch request into a cursor covering every shard. Unlisted shards take the
    /// `ALL_SHARDS` record's mode and position, or start at the tail without one.
    pub fn resolve(&self, request: &[WatchRecord]) -> Result<Cursor, ResolveError> {
        // The `ALL_SHARDS` record, mode and position, for every shard not listed on its own.
        let default = request
            .iter()
            .find(|r| r.shard.get() == ALL_SHARDS)
            .map_or((watch_mode::TAIL, Position::default()), |r| (r.mode, Position::new(r.lsn.get(), r.index.get())));
        for r in request {
            if r.shard.get() != ALL_SHARDS && r.shard.get() as usize >= self.shards.len() {
                return Err(ResolveError::Invalid(format!(
                    "the position names shard {} but this server has {} shards",
                    r.shard.get(),
                    self.shards.len()
                )));
            }
        }
        let mut cursor = Cursor::default();
        for feed in &self.shards {
            let listed = request.iter().find(|r| r.shard.get() == feed.shard);
            let (mode, position) = match listed {
                Some(r) => (r.mode, Position::new(r.lsn.get(), r.index.get())),
                None => default,
            };
            let position = match mode {
                watch_mode::AFTER => {
                    let floor = feed.floor();
                    if position < floor {
                        return Err(ResolveError::TooOld(TooOld { shard: feed.shard, floor }));
                    }
                    // No event of this server has it: its log lost them (a restored backup, a
                    // power loss under `buffered`) or the position is another server's. Waiting
                    // for the log to pass it would skip every event until then, unseen.
                    let last = feed.last();
                    if position > last {
                        // At most `ERROR_MESSAGE_LEN` (120) bytes reach the client: short.
                        return Err(ResolveError::Invalid(format!(
                            "{}:{}.{} is past the newest event {}.{}: lost or never here; resync from balances",
                            feed.shard, position.lsn, position.index, last.lsn, last.index
                        )));
                    }
                    position
                }
                watch_mode::TAIL => feed.last(),
                watch_mode::EARLIEST => feed.floor(),
                other => return Err(ResolveError::Invalid(format!("unknown watch mode {other}"))),
            };
            cursor.set(feed.shard, position);
        }
        Ok(cursor)
    }
}

/// Why a watch request cannot start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolveError {
    TooOld(TooOld),
    Invalid(String),
}

impl core::fmt::Debug for ShardFeed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ShardFeed").field("shard", &self.shard).field("capacity", &self.capacity).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ring as it was kept one event at a time: (events, floor, last).
    fn model_publish(model: &mut (VecDeque<EventRecord>, Position, Position), capacity: usize, lsn: u64, n: u32) {
        let lsn = if lsn > model.2.lsn { lsn } else { model.2.lsn + 1 };
        for index in 0..n {
            let mut event = EventRecord::default();
            event.index.set(index);
            event.lsn.set(lsn);
            model.2 = Position::of(&event);
            if model.0.len() == capacity {
                let old = model.0.pop_front().expect("full");
                model.1 = Position::of(&old);
            }
            model.0.push_back(event);
        }
    }

    #[test]
    fn a_batch_is_published_as_if_one_event_at_a_time() {
        for capacity in [1, 3, 8] {
            let feed = Feed::new(1, capacity);
            let shard = feed.shard(0);
            let mut model = (VecDeque::new(), Position::default(), Position::default());
            let mut batch = BatchEvents::new(0);
            // Batches smaller than, as large as and larger than the ring; lsn 0 (no log) too.
            for (step, n) in [2u32, 1, 5, 8, 0, 3, 13, 1, 9, 4].into_iter().enumerate() {
                let lsn = if step % 3 == 0 { 0 } else { 10 * step as u64 };
                batch.restart(lsn);
                for index in 0..n {
                    let mut event = EventRecord::default();
                    event.index.set(index);
                    batch.events.push(event);
                }
                shard.publish(&mut batch);
                if n > 0 {
                    model_publish(&mut model, capacity, lsn, n);
                }
                assert!(batch.is_empty());
                let mut out = Vec::new();
                shard.read_after(shard.floor(), usize::MAX, &mut out).expect("from the floor");
                assert_eq!(out, Vec::from(model.0.clone()), "capacity {capacity}, step {step}");
                assert_eq!((shard.floor(), shard.last()), (model.1, model.2), "capacity {capacity}, step {step}");
            }
        }
    }

    /// A shard feed (shard 1 of 2, ring of `capacity`) holding `batches` batches of 3 events,
    /// lsns 10, 20, ... (a ring of 4 has evicted some).
    fn fed(capacity: usize, batches: u64) -> Feed {
        let feed = Feed::new(2, capacity);
        let mut batch = BatchEvents::new(0);
        for b in 1..=batches {
            batch.restart(10 * b);
            for index in 0..3 {
                let mut event = EventRecord::default();
                event.index.set(index);
                event.shard.set(1);
                event.amount.set(100 * b + index as u64);
                batch.events.push(event);
            }
            feed.shard(1).publish(&mut batch);
        }
        feed
    }

    fn retained(shard: &ShardFeed) -> Vec<EventRecord> {
        let mut out = Vec::new();
        shard.read_after(shard.floor(), usize::MAX, &mut out).expect("from the floor");
        out
    }

    #[test]
    fn a_snapshot_tail_restores_the_newest_events_and_the_floor_before_them() {
        let source = fed(8, 4); // 12 events published, the newest 8 retained (floor 20.0)
        let all = retained(source.shard(1));
        assert_eq!((all.len(), source.shard(1).floor()), (8, Position::new(20, 0)));
        for (max, capacity) in [(100, 16), (8, 16), (5, 16), (0, 16), (8, 3)] {
            let tail = source.shard(1).encode_tail(max, vec![1, 2, 3]);
            let restored = Feed::new(2, capacity);
            let shard = restored.shard(1);
            shard.restore(40, &tail).expect("a valid tail");
            let kept = all.len().min(max).min(capacity);
            assert_eq!(retained(shard), all[all.len() - kept..], "max {max}, capacity {capacity}");
            let floor = if kept == all.len() { Position::new(20, 0) } else { Position::of(&all[all.len() - kept - 1]) };
            assert_eq!(shard.floor(), floor, "max {max}, capacity {capacity}");
            assert_eq!(shard.last(), if kept > 0 { Position::new(40, 2) } else { floor });
            // A subscriber at any retained position reads on without a gap.
            let mut out = Vec::new();
            assert_eq!(shard.read_after(floor, usize::MAX, &mut out), Ok(kept));
        }
        // A tail of a ring that never evicted: its floor is genesis, all of it retained.
        let young = fed(64, 2);
        let restored = Feed::new(2, 64);
        restored.shard(1).restore(20, &young.shard(1).encode_tail(1 << 16, Vec::new())).unwrap();
        assert_eq!(restored.shard(1).floor(), Position::default());
        assert_eq!(retained(restored.shard(1)), retained(young.shard(1)));
    }

    #[test]
    fn a_position_past_the_newest_event_is_refused_not_waited_for() {
        // Shard 1 holds lsns 10, 20, 30 (3 events each); shard 0 none.
        let feed = fed(64, 3);
        let after = |shard: u16, lsn: u64, index: u32| {
            let mut r = WatchRecord { shard: shard.into(), mode: watch_mode::AFTER, ..WatchRecord::default() };
            r.lsn.set(lsn);
            r.index.set(index);
            r
        };
        for ok in [after(1, 30, 2), after(1, 30, 0), after(1, 0, 0), after(0, 0, 0)] {
            assert!(feed.resolve(&[ok]).is_ok(), "{ok:?}");
        }
        // Waiting for the log to pass these would skip every event until then, unseen.
        for ahead in [after(1, 30, 3), after(1, 31, 0), after(1, 1_000, 0), after(0, 5, 0)] {
            match feed.resolve(&[ahead]) {
                Err(ResolveError::Invalid(message)) => assert!(message.contains("past"), "{message}"),
                other => panic!("{ahead:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_malformed_snapshot_tail_is_refused_and_changes_nothing() {
        let source = fed(8, 4);
        let tail = source.shard(1).encode_tail(100, Vec::new());
        let target = Feed::new(2, 16);
        target.shard(1).start_after(40);
        let untouched = (target.shard(1).floor(), target.shard(1).len());
        let mut cases: Vec<(&str, Vec<u8>, u64, u16)> = vec![
            ("truncated header", tail[..20].to_vec(), 40, 1),
            ("a partial event", tail[..tail.len() - 1].to_vec(), 40, 1),
            ("events after the snapshot", tail.clone(), 39, 1),
            ("another shard's events", tail.clone(), 40, 0),
        ];
        let mut count = tail.clone();
        count[16] += 1;
        cases.push(("count off by one", count, 40, 1));
        let mut reserved = tail.clone();
        reserved[12] = 1;
        cases.push(("reserved field", reserved, 40, 1));
        let mut order = tail.clone();
        order[24..24 + 96].copy_from_slice(&tail[24 + 96..24 + 192]);
        cases.push(("events out of order", order, 40, 1));
        let mut floor = tail.clone();
        floor[0..8].copy_from_slice(&50u64.to_le_bytes());
        cases.push(("floor after the snapshot", floor, 40, 1));
        for (what, bytes, lsn, shard) in cases {
            let feed = if shard == 1 { target.shard(1) } else { target.shard(0) };
            assert!(feed.restore(lsn, &bytes).is_err(), "{what}");
            assert_eq!((target.shard(1).floor(), target.shard(1).len()), untouched, "{what}");
        }
    }
}
