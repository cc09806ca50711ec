//! The embedded store's nonce journal: used nonces appended to segment files, so a restarted
//! node still refuses a replay inside its window.
//!
//! Nonces used to be rows of a redb table. Random keys in a B-tree rewrite a page per insert:
//! under load the writer thread spent ~35,000 instructions per nonce (callgrind) and ~9 µs of
//! CPU per request (10% of the process). Nothing ever reads a nonce back except at start-up,
//! so an append-only log is enough: one `write` and one `fdatasync` per batch.
//!
//! Layout: a directory beside the store file (`<store file>.nonces/`) of segments named
//! `<creation, Unix ms>.log`. A segment is [`MAGIC`] then records of
//! `expires (u64 LE, Unix ms) | length (u32 LE) | "key id\nnonce"`. A new segment is started at
//! every open and every [`SEGMENT_SPAN`]; a sealed segment is deleted once its last nonce has
//! expired. A crash can leave a torn record at the end of the newest segment: loading stops
//! there, and the segment is never appended to again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"KGNONCE1";
/// How long one segment takes appends before the next is started.
pub(super) const SEGMENT_SPAN: Duration = Duration::from_secs(60);
/// A record longer than this is damage, not a nonce (bodies are capped well below it).
const MAX_RECORD: usize = 64 << 20;

/// The open journal; owned by the embedded store's writer thread.
pub(super) struct NonceLog {
    dir: PathBuf,
    current: File,
    current_path: PathBuf,
    current_started: Instant,
    /// [`SEGMENT_SPAN`]; shorter in tests.
    span: Duration,
    /// The latest expiry written to the current segment.
    current_until: u64,
    /// Older segments with the latest expiry each holds.
    sealed: Vec<(PathBuf, u64)>,
    buf: Vec<u8>,
}

/// The journal directory for a store file.
pub(super) fn dir_for(store_file: &Path) -> PathBuf {
    let mut name = store_file.file_name().unwrap_or_default().to_owned();
    name.push(".nonces");
    store_file.with_file_name(name)
}

impl NonceLog {
    /// Opens (or creates) the journal and returns it with every nonce still live at `now_ms`
    /// ("key id\nnonce", expiry in Unix ms). Expired segments are deleted.
    pub(super) fn open(dir: &Path, now_ms: u64) -> io::Result<(Self, Vec<(String, u64)>)> {
        fs::create_dir_all(dir)?;
        // Used nonces say which keys are in use and when: for this user only.
        super::owner_only(dir, 0o700)?;
        let mut live = Vec::new();
        let mut sealed = Vec::new();
        for path in segment_paths(dir)? {
            let until = load_segment(&path, now_ms, &mut live)?;
            if until <= now_ms {
                fs::remove_file(&path)?;
            } else {
                sealed.push((path, until));
            }
        }
        let (current, current_path) = new_segment(dir, now_ms, &sealed)?;
        let log = Self {
            dir: dir.to_owned(),
            current,
            current_path,
            current_started: Instant::now(),
            span: SEGMENT_SPAN,
            current_until: 0,
            sealed,
            buf: Vec::new(),
        };
        Ok((log, live))
    }

    /// Appends a batch and makes it durable: one write, one `fdatasync`.
    pub(super) fn append(&mut self, batch: &[(String, u64)]) -> io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.buf.clear();
        for (key, expires) in batch {
            let len = u32::try_from(key.len())
                .ok()
                .filter(|&n| n as usize <= MAX_RECORD)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "nonce too long"))?;
            self.buf.extend_from_slice(&expires.to_le_bytes());
            self.buf.extend_from_slice(&len.to_le_bytes());
            self.buf.extend_from_slice(key.as_bytes());
            self.current_until = self.current_until.max(*expires);
        }
        let before = self.current.metadata()?.len();
        let written = self
            .current
            .write_all(&self.buf)
            .and_then(|()| self.current.sync_data());
        if written.is_err() {
            // A write cut short (a full disk) would leave a torn record, and loading stops at
            // one: every later append would be lost to a restart. Cut it off (shrinking a
            // file needs no space); the caller keeps the batch and writes it again.
            let _ = self.current.set_len(before);
        }
        written
    }

    /// Starts a new segment once the current one is [`SEGMENT_SPAN`] old, and deletes sealed
    /// segments whose every nonce has expired (an idle node's empty segments at once).
    pub(super) fn maintain(&mut self, now_ms: u64) -> io::Result<()> {
        if self.current_started.elapsed() >= self.span {
            let (file, path) = new_segment(&self.dir, now_ms, &self.sealed)?;
            let old = std::mem::replace(&mut self.current_path, path);
            self.current = file;
            self.current_started = Instant::now();
            let until = std::mem::take(&mut self.current_until);
            self.sealed.push((old, until));
        }
        let mut result = Ok(());
        self.sealed.retain(|(path, until)| {
            if *until > now_ms {
                return true;
            }
            match fs::remove_file(path) {
                Ok(()) => false,
                Err(e) => {
                    result = Err(e);
                    true
                }
            }
        });
        result
    }

    /// Segment files on disk, current one included (for tests and diagnostics).
    #[cfg(test)]
    fn segments(&self) -> usize {
        self.sealed.len() + 1
    }
}

/// Every nonce of the journal still live at `now_ms`, read from the files while the journal
/// may be open for appends (whole batches are read; one being written may be cut short).
/// Nothing is deleted.
pub(super) fn read_live(dir: &Path, now_ms: u64) -> io::Result<Vec<(String, u64)>> {
    let mut live = Vec::new();
    for path in segment_paths(dir)? {
        load_segment(&path, now_ms, &mut live)?;
    }
    Ok(live)
}

/// The segment files of a journal, oldest first (names are creation times).
fn segment_paths(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut names: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    names.sort();
    Ok(names)
}

/// Creates a fresh segment, durable with its directory entry, named after `now_ms` (or later,
/// should a segment of that name exist already).
fn new_segment(dir: &Path, now_ms: u64, sealed: &[(PathBuf, u64)]) -> io::Result<(File, PathBuf)> {
    let mut stamp = now_ms;
    let path = loop {
        let p = dir.join(format!("{stamp:016}.log"));
        if !p.exists() && !sealed.iter().any(|(s, _)| s == &p) {
            break p;
        }
        stamp += 1;
    };
    let mut options = OpenOptions::new();
    options.create_new(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path)?;
    file.write_all(MAGIC)?;
    file.sync_all()?;
    File::open(dir)?.sync_all()?;
    Ok((file, path))
}

/// Adds a segment's live records to `live`; returns the latest expiry it holds. A file that
/// is not a segment is an error; a torn tail ends the segment.
fn load_segment(path: &Path, now_ms: u64, live: &mut Vec<(String, u64)>) -> io::Result<u64> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let Some(mut rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
        if bytes.len() < MAGIC.len() && MAGIC.starts_with(&bytes) {
            // Created, then the process died before the header was durable.
            return Ok(0);
        }
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a keygate nonce segment", path.display()),
        ));
    };
    let mut until = 0;
    while rest.len() >= 12 {
        let (head, tail) = rest.split_at(12);
        let expires = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(head[8..].try_into().unwrap_or_default()) as usize;
        if len > MAX_RECORD || tail.len() < len {
            break;
        }
        let (key, next) = tail.split_at(len);
        rest = next;
        until = until.max(expires);
        if expires > now_ms {
            if let Ok(key) = std::str::from_utf8(key) {
                live.push((key.to_owned(), expires));
            }
        }
    }
    Ok(until)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(items: &[(&str, u64)]) -> Vec<(String, u64)> {
        items.iter().map(|(k, e)| ((*k).to_owned(), *e)).collect()
    }

    #[test]
    fn live_nonces_come_back_and_expired_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, live) = NonceLog::open(dir.path(), 1_000).unwrap();
        assert!(live.is_empty());
        log.append(&batch(&[("k\na", 5_000), ("k\nb", 2_000)]))
            .unwrap();
        log.append(&batch(&[("k\nc", 9_000)])).unwrap();
        drop(log);
        let (_, mut live) = NonceLog::open(dir.path(), 3_000).unwrap();
        live.sort();
        assert_eq!(live, batch(&[("k\na", 5_000), ("k\nc", 9_000)]));
    }

    #[test]
    fn the_open_journal_can_be_read_and_is_left_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = NonceLog::open(dir.path(), 1_000).unwrap();
        log.append(&batch(&[("k\na", 5_000), ("k\nb", 2_000)]))
            .unwrap();
        let mut live = read_live(dir.path(), 3_000).unwrap();
        live.sort();
        assert_eq!(live, batch(&[("k\na", 5_000)]));
        // Reading deleted nothing: the expired record is still in the file.
        assert_eq!(read_live(dir.path(), 0).unwrap().len(), 2);
        log.append(&batch(&[("k\nc", 9_000)])).unwrap();
        assert_eq!(read_live(dir.path(), 3_000).unwrap().len(), 2);
    }

    #[test]
    fn a_torn_tail_keeps_every_whole_record_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = NonceLog::open(dir.path(), 0).unwrap();
        log.append(&batch(&[("k\nwhole", 10_000), ("k\ntorn", 10_000)]))
            .unwrap();
        let path = log.current_path.clone();
        drop(log);
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 2)
            .unwrap();
        let (_, live) = NonceLog::open(dir.path(), 0).unwrap();
        assert_eq!(live, batch(&[("k\nwhole", 10_000)]));
    }

    #[test]
    fn a_foreign_file_is_refused_not_silently_skipped() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("0000000000000001.log"), b"something else").unwrap();
        assert!(NonceLog::open(dir.path(), 0).is_err());
    }

    #[test]
    fn expired_segments_are_deleted_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let files = || fs::read_dir(dir.path()).unwrap().count();
        let (mut log, _) = NonceLog::open(dir.path(), 0).unwrap();
        log.span = Duration::ZERO;
        log.append(&batch(&[("k\nshort", 1_000)])).unwrap();
        log.maintain(500).unwrap();
        assert_eq!(
            log.segments(),
            2,
            "sealed and still live, plus a new current one"
        );
        log.append(&batch(&[("k\nlong", 100_000)])).unwrap();
        log.maintain(50_000).unwrap();
        // The first segment's only nonce has expired; the second is sealed; a third is open.
        assert_eq!((log.segments(), files()), (2, 2));
        log.maintain(60_000).unwrap();
        assert_eq!(files(), 2, "an empty segment is dropped when it is sealed");
        drop(log);
        let (log, live) = NonceLog::open(dir.path(), 60_000).unwrap();
        assert_eq!(live, batch(&[("k\nlong", 100_000)]));
        assert_eq!(log.segments(), 2, "the empty one is deleted on open");
        drop(log);
        let (_, live) = NonceLog::open(dir.path(), 100_000).unwrap();
        assert!(live.is_empty());
        assert_eq!(files(), 1, "only the new current segment is left");
    }
}
