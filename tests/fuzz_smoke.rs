//! The fuzz targets' invariants on stable Rust: every target of `keygate::fuzzing` runs over its
//! seeds (from the signing vectors), the regression inputs of past crashes
//! (`fuzz/regressions/<target>/`), and random mutations of them for a few seconds each. The
//! coverage-guided runs are `scripts/dev fuzz TARGET` (cargo-fuzz, libFuzzer); this is what
//! holds on a machine without them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::path::Path;
use std::time::{Duration, Instant};

use keygate::fuzzing::{seeds, TARGETS};

/// Tokens that reach the parsers' interesting branches faster than random bytes do.
const TOKENS: &[&[u8]] = &[
    b"\xFF",
    b"\n",
    b"x-api-public-key: ",
    b"x-api-signature: ",
    b"x-api-nonce: ",
    b"x-api-timestamp: ",
    b"authorization: Bearer ",
    b"x-api-key: ",
    b"%2e",
    b"%2F",
    b"%61",
    b"..",
    b"//",
    b"\\",
    b";",
    b"\"nonce\":",
    b"null",
    b"1e999",
    b"-1",
    b"18446744073709551616",
    b"[[routes]]\n",
    b"=",
    b"\"",
    b"{",
    b"}",
    b"\xC3\xA9",
    b"\x00",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: deterministic, so a failure reproduces from the printed seed.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, pool: &[Vec<u8>]) {
    for _ in 0..=rng.below(4) {
        let at = rng.below(input.len() + 1);
        match rng.below(6) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let end = (at + 1 + rng.below(8)).min(input.len());
                input.drain(at.min(end)..end);
            }
            2 => input.insert(at, rng.next() as u8),
            3 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                input.splice(at..at, t.iter().copied());
            }
            4 if !pool.is_empty() => {
                // Splice: the head of this input, the tail of another.
                let other = &pool[rng.below(pool.len())];
                let from = rng.below(other.len() + 1);
                input.truncate(at);
                input.extend_from_slice(&other[from..]);
            }
            _ => {
                let len = input.len();
                if len > 0 {
                    let (a, b) = (rng.below(len), rng.below(len));
                    input.swap(a, b);
                }
            }
        }
    }
    input.truncate(64 * 1024);
}

fn regressions(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            out.push(std::fs::read(e.path()).unwrap());
        }
    }
    out
}

#[test]
fn every_target_holds_its_invariants_over_seeds_regressions_and_mutations() {
    let budget = Duration::from_millis(
        std::env::var("FUZZ_SMOKE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000),
    );
    let vectors = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/signing.json"),
    )
    .unwrap();
    let all = seeds(&vectors);
    let mut seed: u64 = std::env::var("FUZZ_SMOKE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6b65_7967_6174_6521);
    for (name, target) in TARGETS {
        let mut pool: Vec<Vec<u8>> = all
            .iter()
            .filter(|(t, _)| t == name)
            .map(|(_, s)| s.clone())
            .collect();
        assert!(!pool.is_empty(), "{name} has no seeds");
        let seeded = pool.len();
        let fixed = regressions(name);
        for input in pool.iter().chain(&fixed) {
            target(input);
        }
        let start = Instant::now();
        let mut rng = Rng(seed);
        let mut runs = 0u64;
        while start.elapsed() < budget {
            let mut input = pool[rng.below(pool.len())].clone();
            mutate(&mut rng, &mut input, &pool);
            target(&input);
            runs += 1;
            // Keep some mutants as parents: deeper inputs without coverage feedback.
            if runs % 64 == 0 && pool.len() < 4096 {
                pool.push(input);
            }
        }
        eprintln!(
            "{name}: {} seeds, {} regressions, {runs} mutated runs in {:?} (seed {seed})",
            seeded,
            fixed.len(),
            start.elapsed()
        );
        assert!(runs > 0, "{name} never ran");
        seed = seed.wrapping_add(1);
    }
}
