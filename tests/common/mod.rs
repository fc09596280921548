//! Shared by the crash tests (`crash.rs`, `power_loss.rs`): the money model their balances are
//! checked against.

use std::collections::BTreeMap;

use stormledger::layout::ReplyRecord;
use stormledger::ledger::{Command, Status};

/// Applies a command's final reply to `balances` with the default split (streamer 50 %, the
/// streamer's union 10 %): a successful tip moves coins, a settlement removes what it swept.
pub fn apply_to_model(balances: &mut BTreeMap<u64, i64>, command: &Command, reply: &ReplyRecord, union: u64) {
    if reply.status.get() != Status::Ok.code() {
        return;
    }
    match *command {
        Command::Tip { from, to, coins, .. } => {
            *balances.entry(from).or_default() -= coins as i64;
            *balances.entry(to).or_default() += (coins * 5_000 / 10_000) as i64;
            *balances.entry(union).or_default() += (coins * 1_000 / 10_000) as i64;
        }
        Command::Settle { account, .. } => *balances.entry(account).or_default() -= reply.value.get(),
        _ => {}
    }
}
