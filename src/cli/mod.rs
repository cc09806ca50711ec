//! Command-line subcommands beyond `serve`: `demo` and `sign`.

pub mod demo;
pub mod sign;
