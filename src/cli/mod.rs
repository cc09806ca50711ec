//! Command-line subcommands beyond `serve`: `demo`, `sign` and `keys`.

pub mod demo;
pub mod keys;
pub mod sign;
