//! The wallet domain: amounts, accounts, commands, statuses and the state machine.
//!
//! Architecture invariant: no IO, no clock, no randomness, no `async`, no serialization derives.
//! Everything here is a pure function of (state, command, timestamp). The one exception is the
//! key of its tables' hash (`hash`), which places entries in memory and never reaches a result.

pub mod account;
pub mod amount;
pub mod command;
pub mod hash;
pub mod id_table;
pub mod index;
pub mod methods;
pub mod state_machine;
pub mod status;
pub mod topups;

pub use command::{AccountKind, Channel, Command, FailReason};
pub use state_machine::{Fanout, Reply, ShardState, TopUpState};
pub use status::Status;
