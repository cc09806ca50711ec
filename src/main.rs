//! The `keygate` binary: hands the command line to [`keygate::cli`].

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: pingora allocates and frees per request, and glibc's
/// `_int_malloc`/`free`/`malloc_consolidate` were ~15% of the proxy's samples under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    keygate::cli::main()
}
