//! Placeholder; filled by the durability work.
