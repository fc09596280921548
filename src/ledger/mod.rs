//! The wallet domain. No IO, no clock, no randomness.
