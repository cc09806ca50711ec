//! Writes the fuzz targets' seed corpora (`keygate::fuzzing::seeds`, from the signing vectors)
//! into `<dir>/<target>/seed-<n>`: `cargo run --example fuzz_seeds -- fuzz/corpus`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: fuzz_seeds DIR");
        return ExitCode::from(64);
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let vectors = match std::fs::read_to_string(root.join("tests/fixtures/signing.json")) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("fuzz_seeds: cannot read the signing vectors: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (n, (target, seed)) in keygate::fuzzing::seeds(&vectors).into_iter().enumerate() {
        let at = dir.join(target);
        if let Err(e) = std::fs::create_dir_all(&at)
            .and_then(|()| std::fs::write(at.join(format!("seed-{n}")), seed))
        {
            eprintln!("fuzz_seeds: cannot write into {}: {e}", at.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
