//! Rendering results: one JSON object per line (`--json`) or one human-readable line.
//!
//! Both forms are built from the same ordered list of fields, so they always say the same thing.
//! Money in yuan is printed as a string with exactly two decimals (`"30.00"`); coins and balances
//! are integers.

use std::io::Write;

use serde_json::Value;

use crate::layout::{CommandRecord, HistoryRecord, ReplyRecord};
use crate::ledger::amount::format_yuan;
use crate::ledger::command::{flags, kind, Command};
use crate::ledger::status::Status;

/// An ordered JSON object (serde_json's map is sorted; we want `status` first and the fields in
/// a stable, meaningful order).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Obj(pub Vec<(String, Field)>);

/// One field of an `Obj`: a plain JSON value, or an array of ordered objects.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    Value(Value),
    List(Vec<Obj>),
}

impl Obj {
    pub fn new() -> Obj {
        Obj(Vec::new())
    }

    /// Sets `key`, replacing an earlier value in place.
    pub fn set(&mut self, key: &str, value: impl Into<Value>) -> &mut Obj {
        self.set_field(key, Field::Value(value.into()))
    }

    /// Sets `key` to an array of objects.
    pub fn set_list(&mut self, key: &str, list: Vec<Obj>) -> &mut Obj {
        self.set_field(key, Field::List(list))
    }

    fn set_field(&mut self, key: &str, field: Field) -> &mut Obj {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = field,
            None => self.0.push((key.to_string(), field)),
        }
        self
    }

    /// The plain value of `key` (`None` if absent or a list).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).and_then(|(_, f)| match f {
            Field::Value(v) => Some(v),
            Field::List(_) => None,
        })
    }

    /// The plain fields as `key=value` words (strings unquoted), skipping `skip`, nulls and lists.
    pub fn words(&self, skip: &[&str]) -> String {
        let mut out = Vec::new();
        for (k, f) in &self.0 {
            let Field::Value(v) = f else { continue };
            if skip.contains(&k.as_str()) || v.is_null() {
                continue;
            }
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push(format!("{k}={v}"));
        }
        out.join(" ")
    }

    /// As a serde value (key order is then serde_json's).
    pub fn to_value(&self) -> Value {
        let field = |f: &Field| match f {
            Field::Value(v) => v.clone(),
            Field::List(list) => Value::Array(list.iter().map(Obj::to_value).collect()),
        };
        Value::Object(self.0.iter().map(|(k, f)| (k.clone(), field(f))).collect())
    }
}

impl core::fmt::Display for Obj {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("{")?;
        for (i, (k, field)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}:", Value::String(k.clone()))?;
            match field {
                Field::Value(v) => write!(f, "{v}")?,
                Field::List(list) => {
                    f.write_str("[")?;
                    for (j, obj) in list.iter().enumerate() {
                        if j > 0 {
                            f.write_str(",")?;
                        }
                        write!(f, "{obj}")?;
                    }
                    f.write_str("]")?;
                }
            }
        }
        f.write_str("}")
    }
}

/// Prints one line to stdout, ignoring a closed pipe (`stormledger history 7 | head`).
pub fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The name of a status code, also for codes this version does not know.
pub fn status_name(code: u16) -> String {
    match Status::from_code(code) {
        Some(s) => s.name().to_string(),
        None => format!("unknown_status_{code}"),
    }
}

/// The request's own fields of a command.
pub fn command_fields(cmd: &Command, obj: &mut Obj) {
    match *cmd {
        Command::CreateAccount { account, kind, flags: f, union } => {
            obj.set("account", account).set("account_kind", kind.name());
            obj.set("real_name", f & flags::REAL_NAME != 0).set("minor", f & flags::MINOR != 0);
            if union != 0 {
                obj.set("union", union);
            }
        }
        Command::BindMethod { user, method, channel } => {
            obj.set("user", user).set("method", method).set("channel", channel.name());
        }
        Command::TopUpBegin { id, user, method, fen } => {
            obj.set("id", id).set("user", user).set("method", method).set("amount", format_yuan(fen as i64));
        }
        Command::TopUpConfirm { id, fen, channel_txn, paid_by } => {
            let record = CommandRecord { text: channel_txn, ..CommandRecord::default() };
            obj.set("id", id).set("channel_txn", record.text_str()).set("amount", format_yuan(fen as i64));
            if paid_by != 0 {
                obj.set("paid_by", paid_by);
            }
        }
        Command::TopUpFail { id, reason } => {
            obj.set("id", id).set("reason", reason.name());
        }
        Command::Tip { id, from, to, coins } => {
            obj.set("id", id).set("from", from).set("to", to).set("coins", coins);
        }
        Command::Gift { id, from, to, gift, count } => {
            obj.set("id", id).set("from", from).set("to", to).set("gift", gift).set("count", count);
        }
        Command::PayEvent { id, from, to, event, coins } => {
            obj.set("id", id).set("from", from).set("to", to).set("event", event).set("coins", coins);
        }
        Command::Settle { id, account } => {
            obj.set("id", id).set("account", account);
        }
        Command::SetDailyCap { user, coins } => {
            obj.set("user", user).set("coins", coins);
        }
        Command::Freeze { account, .. } => {
            // Whether it is frozen now only with `ok` (`result_fields`): a refusal changed nothing.
            obj.set("account", account);
        }
        Command::SettleTotal { id, total, shards, at } => {
            obj.set("id", id).set("settled", total).set("shards", shards).set("settle_timestamp", at);
        }
        Command::Tick
        | Command::ReplicaCreate { .. }
        | Command::ReplicaFreeze { .. }
        | Command::ReplicaSettle { .. } => {}
    }
}

/// What a reply's `value`/`value2` mean for this command and status (see `state_machine`).
pub fn result_fields(cmd: &Command, status: Option<Status>, value: i64, value2: i64, obj: &mut Obj) {
    match (status, cmd) {
        (Some(Status::Ok), Command::Freeze { frozen, .. }) => {
            obj.set("frozen", *frozen);
        }
        (Some(Status::Ok), Command::TopUpBegin { .. }) => {
            obj.set("coins", value);
        }
        (Some(Status::Ok), Command::TopUpConfirm { .. }) => {
            obj.set("coins", value).set("balance", value2);
        }
        (Some(Status::Ok), Command::Tip { .. } | Command::Gift { .. } | Command::PayEvent { .. }) => {
            obj.set("spent", value2).set("balance", value);
        }
        (Some(Status::Ok), Command::Settle { .. }) => {
            // `shards`: how many shards' sweeps `settled` counts (all of them, but for a retry
            // answered after a shard forgot its part: docs/protocol.md).
            obj.set("settled", value).set("shards", value2);
        }
        (Some(Status::InsufficientFunds), _) => {
            obj.set("balance", value);
        }
        (Some(Status::ExceedsDailyCap), _) => {
            obj.set("cap_left", value);
        }
        (Some(Status::TopUpRefunded), _) => {
            obj.set("refunded", format_yuan(value));
        }
        (Some(Status::InvalidAmount), Command::SetDailyCap { .. }) if value > 0 => {
            obj.set("cap_max", value);
        }
        _ => {}
    }
}

/// The report of one write: status, kind, the command's fields, the result's values.
pub fn write_report(kind_code: u8, cmd: Option<&Command>, extra: &Obj, reply: &ReplyRecord) -> Obj {
    let code = reply.status.get();
    let status = Status::from_code(code);
    let mut obj = Obj::new();
    obj.set("status", status_name(code)).set("kind", kind::name(kind_code));
    for (k, v) in &extra.0 {
        obj.set_field(k, v.clone());
    }
    if let Some(cmd) = cmd {
        command_fields(cmd, &mut obj);
        result_fields(cmd, status, reply.value.get(), reply.value2.get(), &mut obj);
    } else if kind_code == kind::SNAPSHOT && status == Some(Status::Ok) {
        // Every shard wrote one, durably.
        obj.set("shards", reply.value.get());
    }
    if reply.flags & 1 != 0 {
        obj.set("duplicate", true);
    }
    obj
}

/// The human form of a write report: `STATUS KIND key=value ...`.
pub fn write_line(obj: &Obj) -> String {
    let status = obj.get("status").and_then(Value::as_str).unwrap_or("?");
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("?");
    let words = obj.words(&["status", "kind", "duplicate"]);
    let dup = if obj.get("duplicate").is_some() { " (retry: the original result of this id)" } else { "" };
    let sep = if words.is_empty() { "" } else { " " };
    format!("{status} {kind}{sep}{words}{dup}")
}

/// The JSON form of one history entry.
pub fn history_entry(h: &HistoryRecord) -> Obj {
    let mut obj = Obj::new();
    let ts = h.timestamp.get();
    obj.set("time", format_time(ts)).set("timestamp", ts);
    obj.set("id", h.id.get()).set("kind", kind::name(h.kind)).set("status", status_name(h.status.get()));
    obj.set("amount", h.amount.get()).set("balance_after", h.balance_after.get());
    obj.set("counterparty", h.counterparty.get()).set("shard", h.shard).set("detail", h.detail.get());
    match h.kind {
        kind::TOPUP_BEGIN | kind::TOPUP_CONFIRM => {
            obj.set("topup_amount", format_yuan(h.detail.get() as i64));
        }
        kind::GIFT => {
            obj.set("gift", h.detail.get());
        }
        kind::PAY_EVENT => {
            obj.set("event", h.detail.get());
        }
        _ => {}
    }
    obj
}

/// A history entry's `detail` as the human output shows it: named, in its unit (`topup=30.00`
/// yuan, `gift=3`, `event=5`), empty when the kind has none.
pub fn history_detail(h: &HistoryRecord) -> String {
    match h.kind {
        kind::TOPUP_BEGIN | kind::TOPUP_CONFIRM => format!("topup={}", format_yuan(h.detail.get() as i64)),
        kind::GIFT => format!("gift={}", h.detail.get()),
        kind::PAY_EVENT => format!("event={}", h.detail.get()),
        _ if h.detail.get() == 0 => String::new(),
        _ => format!("detail={}", h.detail.get()),
    }
}

/// Nanoseconds since the Unix epoch as RFC 3339 UTC with nanoseconds.
pub fn format_time(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let nanos = ns % 1_000_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keeps_field_order() {
        let mut o = Obj::new();
        o.set("status", "ok").set("account", 7).set("balance", 200).set("account", 8);
        assert_eq!(o.to_string(), r#"{"status":"ok","account":8,"balance":200}"#);
        let parsed: Value = serde_json::from_str(&o.to_string()).unwrap();
        assert_eq!(parsed, o.to_value());
        let mut inner = Obj::new();
        inner.set("z", 1).set("a", 2);
        o.set_list("records", vec![inner.clone(), inner]);
        assert_eq!(
            o.to_string(),
            r#"{"status":"ok","account":8,"balance":200,"records":[{"z":1,"a":2},{"z":1,"a":2}]}"#
        );
        let parsed: Value = serde_json::from_str(&o.to_string()).unwrap();
        assert_eq!(parsed, o.to_value());
        assert_eq!(o.words(&["status"]), "account=8 balance=200");
    }

    #[test]
    fn formats_times() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(format_time(951_782_400_000_000_001), "2000-02-29T00:00:00.000000001Z");
        assert_eq!(format_time(1_700_000_000_123_000_000), "2023-11-14T22:13:20.123000000Z");
    }

    #[test]
    fn write_reports_name_values() {
        let cmd = Command::Tip { id: 9, from: 1, to: 2, coins: 500 };
        let mut reply = ReplyRecord::default();
        reply.status.set(Status::InsufficientFunds.code());
        reply.value.set(200);
        let obj = write_report(kind::TIP, Some(&cmd), &Obj::new(), &reply);
        assert_eq!(write_line(&obj), "insufficient_funds tip id=9 from=1 to=2 coins=500 balance=200");
        reply.status.set(0);
        reply.flags = 1;
        reply.value2.set(500);
        let obj = write_report(kind::TIP, Some(&cmd), &Obj::new(), &reply);
        assert_eq!(obj.get("duplicate"), Some(&Value::Bool(true)));
        assert_eq!(obj.get("spent"), Some(&Value::from(500)));
        // A snapshot says how many shards wrote one.
        let mut reply = ReplyRecord::default();
        reply.value.set(2);
        assert_eq!(write_line(&write_report(kind::SNAPSHOT, None, &Obj::new(), &reply)), "ok snapshot shards=2");
    }
}
