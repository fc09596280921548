//! Encoding of one shard's `ShardState` into snapshot sections, and back.
//!
//! Fixed-size little-endian records per section, written in a deterministic order (creation
//! order for accounts, ring order for ids and history, sorted keys for maps), so the same state
//! always gives the same bytes. Decoding checks every length and rebuilds the derived indexes.

use std::collections::VecDeque;

use crate::config::{LedgerConfig, ShardLimits};
use crate::layout::{CommandRecord, TEXT_LEN};
use crate::ledger::account::{Account, HistoryEntry, HistoryRing};
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

const ACCOUNT_SIZE: usize = 56;
const METHOD_SIZE: usize = 24;
const ID_SIZE: usize = 8 + 8 + 80 + 2 + 1 + 8 + 8;
const TOPUP_SIZE: usize = 8 * 6 + 1 + 1 + 1 + TEXT_LEN + 8 + 1 + 2 + 8 + 8 + 1;
const HISTORY_SIZE: usize = 8 * 7 + 2 + 1;
const OUTBOX_SIZE: usize = 8 + 80;

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
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
}

/// A bounds-checked little-endian reader; every failure is a decode error naming the section.
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
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
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

/// The sections of a shard's snapshot.
pub fn encode(state: &ShardState) -> Vec<(u32, Vec<u8>)> {
    assert!(state.evicted.is_empty(), "evicted ids are drained after every batch");
    let mut meta = W(Vec::new());
    meta.u16(state.shard);
    meta.u16(state.shards);
    meta.u64(state.last_timestamp);
    meta.u64(state.id_seq);
    meta.u64(state.replica_out);
    meta.u64(state.history.appended());
    for &r in &state.replica_in {
        meta.u64(r);
    }

    let mut accounts = W(Vec::with_capacity(state.accounts.len() * ACCOUNT_SIZE));
    for a in &state.accounts {
        accounts.u64(a.id);
        accounts.i64(a.balance);
        accounts.u64(a.union);
        accounts.u64(a.spent_today);
        accounts.u64(a.daily_cap);
        accounts.u64(a.history_head);
        accounts.u32(a.spent_day);
        accounts.u8(a.kind as u8);
        accounts.u8(a.flags);
        accounts.u8(a.methods);
        accounts.u8(0);
    }

    let mut methods_sorted: Vec<_> = state.methods.iter().map(|(&k, &v)| (k, v)).collect();
    methods_sorted.sort_unstable_by_key(|e| e.0);
    let mut methods = W(Vec::with_capacity(methods_sorted.len() * METHOD_SIZE));
    for ((user, method), channel) in methods_sorted {
        methods.u64(user);
        methods.u64(method);
        methods.u64(channel as u64);
    }

    let mut ids = W(Vec::with_capacity(state.id_ring.len() * ID_SIZE));
    for (seq, record) in &state.id_ring {
        ids.u64(*seq);
        ids.u64(record.timestamp);
        ids.command(&record.command);
        reply_fields(&mut ids, &record.reply);
    }

    let mut topups_sorted: Vec<_> = state.topups.iter().map(|(&k, v)| (k, *v)).collect();
    topups_sorted.sort_unstable_by_key(|e| e.0);
    let mut topups = W(Vec::with_capacity(topups_sorted.len() * TOPUP_SIZE));
    for (id, t) in topups_sorted {
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
                reply_fields(&mut topups, &r);
            }
            None => {
                topups.u8(0);
                reply_fields(&mut topups, &Reply::status(Status::Ok));
            }
        }
        topups.u8(t.id_evicted as u8);
    }

    let mut pending = W(Vec::with_capacity(state.pending.len() * 16));
    for &(deadline, id) in &state.pending {
        pending.u64(deadline);
        pending.u64(id);
    }

    let mut history =
        W(Vec::with_capacity(state.history.capacity().min(state.history.appended()) as usize * HISTORY_SIZE));
    for (_, e) in state.history.retained() {
        history.u64(e.prev);
        history.u64(e.timestamp);
        history.u64(e.id);
        history.u64(e.counterparty);
        history.i64(e.amount);
        history.i64(e.balance_after);
        history.u64(e.detail);
        history.u16(e.status);
        history.u8(e.kind);
    }

    let mut outbox = W(Vec::with_capacity(state.outbox.len() * OUTBOX_SIZE));
    for (seq, c) in &state.outbox {
        outbox.u64(*seq);
        outbox.command(c);
    }

    vec![
        (SECTION_META, meta.0),
        (SECTION_ACCOUNTS, accounts.0),
        (SECTION_METHODS, methods.0),
        (SECTION_IDS, ids.0),
        (SECTION_TOPUPS, topups.0),
        (SECTION_PENDING, pending.0),
        (SECTION_HISTORY, history.0),
        (SECTION_OUTBOX, outbox.0),
    ]
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
    let mut state = ShardState::new(shard, shards, config, limits.clone());
    // Genesis created the system accounts; the snapshot has them (with balances), so start empty.
    state.accounts.clear();
    state.accounts.reserve(limits.accounts_max as usize);
    state.index = std::sync::Arc::new(crate::ledger::index::AccountIndex::new(limits.accounts_max));
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

    let mut a = get(SECTION_ACCOUNTS, "accounts")?;
    while !a.done() {
        let id = a.u64()?;
        let balance = a.i64()?;
        let union = a.u64()?;
        let spent_today = a.u64()?;
        let daily_cap = a.u64()?;
        let history_head = a.u64()?;
        let spent_day = a.u32()?;
        let kind = AccountKind::from_code(a.u8()? as u16).ok_or_else(|| a.bad("account kind"))?;
        let flags = a.u8()?;
        let methods = a.u8()?;
        a.u8()?;
        let account =
            Account { id, balance, union, spent_today, daily_cap, history_head, spent_day, kind, flags, methods };
        if state.index.lookup(id).is_some() {
            return Err(a.bad("duplicate account"));
        }
        let slot = state.index.insert(id).ok_or("snapshot holds more accounts than accounts_max")?;
        state.index.publish(slot, balance);
        state.accounts.push(account);
    }

    let mut r = get(SECTION_METHODS, "methods")?;
    while !r.done() {
        let key = (r.u64()?, r.u64()?);
        let channel = Channel::from_code(r.u64()? as u16).ok_or_else(|| r.bad("channel"))?;
        state.methods.insert(key, channel);
    }

    let mut r = get(SECTION_IDS, "ids")?;
    let mut ring = VecDeque::new();
    while !r.done() {
        let seq = r.u64()?;
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
    while !r.done() {
        let id = r.u64()?;
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
        state.topups.insert(id, topup);
    }

    let mut r = get(SECTION_PENDING, "pending")?;
    while !r.done() {
        state.pending.push_back((r.u64()?, r.u64()?));
    }

    let mut r = get(SECTION_HISTORY, "history")?;
    let mut entries = Vec::new();
    while !r.done() {
        entries.push(HistoryEntry {
            prev: r.u64()?,
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
    if entries.len() as u64 > history_next || entries.len() > limits.history_max as usize {
        return Err("snapshot history is longer than the ring".into());
    }
    state.history = HistoryRing::restore(limits.history_max, history_next, entries);

    let mut r = get(SECTION_OUTBOX, "outbox")?;
    while !r.done() {
        let seq = r.u64()?;
        state.outbox.push_back((seq, r.command()?));
    }
    Ok(state)
}
