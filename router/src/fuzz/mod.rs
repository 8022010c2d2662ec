//! Fuzz targets for the parts of the router that read untrusted bytes, and a
//! small mutation loop that runs them under `cargo test`.
//!
//! Each target is a function of one byte string that panics when a property
//! fails, so the same function serves three runners: the time-boxed loop in
//! this module's tests (every CI run), `scripts/fuzz.sh` (the same loop, for
//! longer) and the `cargo fuzz` targets in `fuzz/` (coverage-guided, nightly).
//! A target reads its first bytes as choices (a format, a chunking, a mode)
//! with [`Input`] and the rest as the data under test:
//!
//! - [`frames::frames`]: the frame decoder and the message parsers;
//! - [`frames::startup`]: the startup packet;
//! - [`sql::sql`]: shape analysis, constant lifting and the analysis cache;
//! - [`copy::copy`]: the COPY row splitter;
//! - [`copy_binary::copy_binary`]: the binary COPY splitter and stream joiner;
//! - [`values::values`]: the fan-out value parsers and arithmetic;
//! - [`scram::scram`]: both sides of the SCRAM exchange.
//!
//! Seeds live in `router/fuzz-corpus/<target>/`, one input a file; a file in
//! there is also a regression test, run in full every time. See docs/fuzzing.md.

pub mod copy;
pub mod copy_binary;
pub mod frames;
pub mod scram;
pub mod sql;
pub mod values;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A target: panics when a property does not hold for the input.
pub type Target = fn(&[u8]);

/// The targets by name, as their corpus folders and `fuzz/` targets are named.
pub const TARGETS: &[(&str, Target)] = &[
    ("frames", frames::frames),
    ("startup", frames::startup),
    ("sql", sql::sql),
    ("copy", copy::copy),
    ("copy_binary", copy_binary::copy_binary),
    ("values", values::values),
    ("scram", scram::scram),
];

/// Choices read off the front of an input; past its end every choice is 0.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let v = u16::from_le_bytes([self.u8(), self.u8()]) as usize;
        v % n
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// Bytes up to the next `sep` (which is consumed), or all that is left.
    pub fn until(&mut self, sep: u8) -> &'a [u8] {
        match self.data.iter().position(|&b| b == sep) {
            Some(i) => {
                let head = &self.data[..i];
                self.data = &self.data[i + 1..];
                head
            }
            None => self.rest(),
        }
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Splits `data` into chunks whose sizes come from `sizes` (cycled; 0 stands
/// for "all the rest"), the way bytes arrive from a socket.
pub fn chunks<'a>(data: &'a [u8], sizes: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = match sizes.get(i % sizes.len().max(1)).copied().unwrap_or(0) as usize {
            0 => rest.len(),
            n => n.min(rest.len()),
        };
        out.push(&rest[..n]);
        rest = &rest[n..];
        i += 1;
    }
    out
}

/// The seeds of a target: every file under `dir` (recursively), sorted by path.
pub fn load_corpus(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((p, bytes));
            }
        }
    }
    out.sort();
    out
}

/// Words worth splicing into inputs of any target: protocol numbers, SQL
/// punctuation and keywords, COPY and SCRAM syntax.
const DICTIONARY: &[&[u8]] = &[
    b"\0\0\0\x04",
    b"\x7f\xff\xff\xff",
    b"\xff\xff\xff\xff",
    b"\x80\0\0\0",
    b"\0\x03\0\0",
    b"\x04\xd2\x16\x2f",
    b"\x04\xd2\x16\x2e",
    b"'",
    b"''",
    b"E'\\",
    b"$$",
    b"$a$",
    b"\"",
    b"--",
    b"/*",
    b"*/",
    b"$1",
    b"-",
    b".",
    b"e+",
    b"2147483648",
    b"-9223372036854775808",
    b"99999999999999999999",
    b"SELECT ",
    b" WHERE tenant_id = ",
    b"INSERT INTO orders (tenant_id, id) VALUES ",
    b"UPDATE orders SET tenant_id = ",
    b"SET shardgate.tenant = ",
    b"/* tenant_id=7 */",
    b";",
    b",",
    b"(",
    b")",
    b"PGCOPY\n\xff\r\n\0",
    b"\xff\xff",
    b"\0\x02",
    b"\\N",
    b"\\.",
    b"\\",
    b"\\x4",
    b"\\101",
    b"\t",
    b"\r",
    b"\n",
    b"\r\n",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b" BC",
    b"n,,n=,r=",
    b",p=",
    b"c=biws,r=",
];

/// Changes `input` by 1 to 8 random edits, splicing from `corpus` now and then.
pub fn mutate(rng: &mut StdRng, input: &mut Vec<u8>, corpus: &[Vec<u8>], max_len: usize) {
    for _ in 0..rng.gen_range(1..=8) {
        let len = input.len();
        match rng.gen_range(0..10) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                input[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.gen_range(0..len);
                input[i] = [0, 0xff, 0x7f, 0x80, b'0', b'\n', b' ', rng.gen()][rng.gen_range(0..8)];
            }
            2 => {
                let i = rng.gen_range(0..=len);
                let n = rng.gen_range(1..=16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                input.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.gen_range(0..len);
                let n = rng.gen_range(1..=(len - i).min(32));
                input.drain(i..i + n);
            }
            4 if len > 0 => {
                // Repeat a slice: long runs, repeated fields.
                let i = rng.gen_range(0..len);
                let n = rng.gen_range(1..=(len - i).min(64));
                let piece = input[i..i + n].to_vec();
                let at = rng.gen_range(0..=len);
                input.splice(at..at, piece);
            }
            5 if !corpus.is_empty() => {
                let other = &corpus[rng.gen_range(0..corpus.len())];
                if !other.is_empty() {
                    let i = rng.gen_range(0..other.len());
                    let n = rng.gen_range(1..=(other.len() - i));
                    let at = rng.gen_range(0..=len);
                    input.splice(at..at, other[i..i + n].iter().copied());
                }
            }
            6 if len >= 4 => {
                // An interesting 32-bit number, big-endian as the protocol writes it.
                let i = rng.gen_range(0..=len - 4);
                let v: i32 =
                    [0, 1, 3, 4, 5, -1, -2, i32::MAX, i32::MIN, 0x7fff, 1 << 20, len as i32][rng.gen_range(0..12)];
                input[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            7 if len > 0 => input.truncate(rng.gen_range(0..len)),
            _ => {
                let word = DICTIONARY[rng.gen_range(0..DICTIONARY.len())];
                let at = rng.gen_range(0..=len);
                input.splice(at..at, word.iter().copied());
            }
        }
    }
    input.truncate(max_len);
}

/// The time each target gets: `SHARDGATE_FUZZ_SECS` (default `default`).
pub fn budget(default: Duration) -> Duration {
    std::env::var("SHARDGATE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .unwrap_or(default)
}

/// What one run of the loop did.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub runs: u64,
}

/// Runs `target` on every seed, then on mutated seeds (and fresh random bytes)
/// until `budget` is spent. A panic is a failure: the input is written to
/// `crash_dir` and this panics with its path, the RNG seed and the input's hex,
/// so that the input can be added to the corpus as a regression test.
/// `SHARDGATE_FUZZ_SEED` fixes the RNG seed to replay a run.
pub fn run(name: &str, target: Target, seeds: &[Vec<u8>], budget: Duration, crash_dir: &Path) -> Report {
    let seed = std::env::var("SHARDGATE_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    let max_len = 4096;
    let mut runs = 0u64;
    let mut check = |input: &[u8]| {
        runs += 1;
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| target(input))) {
            let message = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let path = save_crash(crash_dir, name, input);
            panic!(
                "fuzz target {name} failed ({message}) on an input saved at {}; seed {seed}; input hex: {}",
                path.display(),
                hex(input)
            );
        }
    };
    for s in seeds {
        check(s);
    }
    let started = Instant::now();
    let mut input = Vec::new();
    while started.elapsed() < budget {
        if seeds.is_empty() || rng.gen_range(0..16) == 0 {
            let n = rng.gen_range(0..256);
            input.clear();
            input.extend((0..n).map(|_| rng.gen::<u8>()));
        } else {
            input.clear();
            input.extend_from_slice(&seeds[rng.gen_range(0..seeds.len())]);
        }
        mutate(&mut rng, &mut input, seeds, max_len);
        check(&input);
    }
    Report { seed, runs }
}

fn save_crash(dir: &Path, name: &str, input: &[u8]) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    input.hash(&mut h);
    let path = dir.join(name).join(format!("crash-{:016x}", h.finish()));
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let _ = std::fs::write(&path, input);
    path
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each target's seconds when `SHARDGATE_FUZZ_SECS` is not set: the seven
    /// together add a little over a minute of CPU to a test run.
    const DEFAULT_SECS: u64 = 10;

    fn corpus_dir(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-corpus").join(name)
    }

    fn fuzz(name: &str) {
        let target = TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t).unwrap();
        let seeds: Vec<Vec<u8>> = load_corpus(&corpus_dir(name)).into_iter().map(|(_, b)| b).collect();
        assert!(!seeds.is_empty(), "no seeds in {}", corpus_dir(name).display());
        let crash_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-crashes");
        let report = run(name, target, &seeds, budget(Duration::from_secs(DEFAULT_SECS)), &crash_dir);
        eprintln!("fuzz {name}: {} inputs ({} seeds), seed {}", report.runs, seeds.len(), report.seed);
    }

    #[test]
    fn fuzz_frames() {
        fuzz("frames");
    }

    #[test]
    fn fuzz_startup() {
        fuzz("startup");
    }

    #[test]
    fn fuzz_sql() {
        fuzz("sql");
    }

    #[test]
    fn fuzz_copy() {
        fuzz("copy");
    }

    #[test]
    fn fuzz_copy_binary() {
        fuzz("copy_binary");
    }

    #[test]
    fn fuzz_values() {
        fuzz("values");
    }

    #[test]
    fn fuzz_scram() {
        fuzz("scram");
    }

    #[test]
    fn the_loop_reports_a_failing_target_with_its_input() {
        fn fails_on_zz(data: &[u8]) {
            assert!(!data.windows(2).any(|w| w == b"zz"), "found zz");
        }
        let dir = std::env::temp_dir().join(format!("shardgate-fuzz-{}", std::process::id()));
        let seeds = vec![b"az".to_vec(), b"xz".to_vec()];
        let caught = catch_unwind(|| run("selftest", fails_on_zz, &[b"azz".to_vec()], Duration::from_millis(1), &dir))
            .unwrap_err();
        let message = caught.downcast_ref::<String>().unwrap();
        assert!(message.contains("found zz") && message.contains("617a7a"), "{message}");
        assert_eq!(std::fs::read_dir(dir.join("selftest")).unwrap().count(), 1);
        let _ = std::fs::remove_dir_all(&dir);
        // Passing seeds and mutations of them: no failure.
        let report = run("selftest", |_| {}, &seeds, Duration::from_millis(20), &dir);
        assert!(report.runs >= 2);
    }

    #[test]
    fn input_choices_and_chunks() {
        let mut i = Input::new(b"\x05\x01\x00abc;def");
        assert_eq!(i.u8(), 5);
        assert_eq!(i.below(7), 1);
        assert_eq!(i.until(b';'), b"abc");
        assert_eq!(i.rest(), b"def");
        assert_eq!(i.u8(), 0);
        assert_eq!(chunks(b"abcdef", &[2, 0]), vec![&b"ab"[..], b"cdef"]);
        assert_eq!(chunks(b"abc", &[]), vec![&b"abc"[..]]);
    }
}
