//! `keygate store backup` and `restore`: the whole store as one JSON Lines file — key records
//! (secrets still sealed, bearer secrets still hashed, usage counters), audit entries, metered
//! keys' credits, the public keys of every key ever revoked and the secret hashes of every
//! bearer key ever revoked (tombstones) and the sealed assertion keyring — and back.
//!
//! The file ends with a line that counts what came before it, so a truncated or cut-short
//! backup is refused before anything is written. Restoring into a store that already holds
//! some of it keeps what is there (a key revoked since the backup stays revoked) and adds the
//! rest, so a restore that stopped half way can be run again.

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::keys::{
    copy_audit, copy_key, AuditEntry, CopyReport, KeyRecord, StoreError, Versioned, Walk,
};
use crate::limits::credits::{CreditOp, RefillNow};
use crate::server::Stores;

/// The format written; a reader refuses any other.
pub const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("line {line}: {reason}")]
    Format { line: usize, reason: String },
}

/// One line of the file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Line {
    Header {
        format: u32,
        #[serde(with = "time::serde::rfc3339")]
        created_at: OffsetDateTime,
        keygate: String,
    },
    Key(Box<KeyRecord>),
    Audit(AuditEntry),
    /// A metered key's counter, and the refill period it belongs to.
    Credits {
        key_id: String,
        remaining: u64,
        #[serde(default)]
        period: Option<u64>,
    },
    /// The public key of a key revoked at some time (its record may be gone), or the SHA-256
    /// (lowercase hex) of a revoked bearer key's secret: exactly one of the two.
    Tombstone {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        public_key: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret_sha256: Option<String>,
    },
    /// The sealed assertion keyring document.
    SigningKeys {
        body: serde_json::Value,
    },
    End(Counts),
}

/// What a backup holds (its last line), or what a restore read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counts {
    pub keys: usize,
    pub audit: usize,
    pub credits: usize,
    pub signing_keys: bool,
    /// Absent from backups made before tombstones: none.
    #[serde(default)]
    pub tombstones: usize,
    /// Bearer secret tombstones; absent from backups made before them: none.
    #[serde(default)]
    pub secret_tombstones: usize,
}

fn write_line(out: &mut dyn Write, line: &Line) -> Result<(), BackupError> {
    serde_json::to_writer(&mut *out, line).map_err(std::io::Error::from)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Writes every record, audit entry, credit counter and the keyring of `stores` to `out`.
pub async fn backup(
    stores: &Stores,
    out: &mut dyn Write,
    now: OffsetDateTime,
) -> Result<Counts, BackupError> {
    let mut counts = Counts::default();
    write_line(
        out,
        &Line::Header {
            format: FORMAT,
            created_at: now,
            keygate: env!("CARGO_PKG_VERSION").to_owned(),
        },
    )?;
    let mut records = Walk::new(stores.keys.as_ref());
    while let Some(page) = records.next_records().await? {
        for record in page {
            let metered = record.metered.then(|| record.refill.map(|r| r.at(now)));
            let id = record.id.clone();
            write_line(out, &Line::Key(Box::new(record)))?;
            counts.keys += 1;
            if let Some(refill) = metered {
                // Read as of now, so a refill that fell due is in the number written.
                let remaining = stores.credits.remaining(&id, refill).await?;
                write_line(
                    out,
                    &Line::Credits {
                        key_id: id,
                        remaining,
                        period: refill.map(|r| r.period),
                    },
                )?;
                counts.credits += 1;
            }
        }
    }
    for public_key in stores.keys.tombstones().await? {
        let public_key = Some(public_key);
        let line = Line::Tombstone {
            public_key,
            secret_sha256: None,
        };
        write_line(out, &line)?;
        counts.tombstones += 1;
    }
    for hash in stores.keys.secret_tombstones().await? {
        let line = Line::Tombstone {
            public_key: None,
            secret_sha256: Some(hex::encode(hash)),
        };
        write_line(out, &line)?;
        counts.secret_tombstones += 1;
    }
    let mut audit = Walk::new(stores.keys.as_ref());
    while let Some(page) = audit.next_audit().await? {
        for entry in page {
            write_line(out, &Line::Audit(entry))?;
            counts.audit += 1;
        }
    }
    if let Some(doc) = stores.signing_keys.load_signing_keys().await? {
        let body = serde_json::from_slice(&doc.body)
            .map_err(|e| StoreError::Corrupt(format!("assertion keyring: {e}")))?;
        write_line(out, &Line::SigningKeys { body })?;
        counts.signing_keys = true;
    }
    write_line(out, &Line::End(counts))?;
    out.flush()?;
    Ok(counts)
}

/// A tombstone line, checked.
enum Tombstone {
    PublicKey(String),
    Secret([u8; 32]),
}

/// Checks a tombstone line `n`: one public key or one 32-byte hex hash, not both, not neither.
fn tombstone(
    n: usize,
    public_key: Option<String>,
    secret_sha256: Option<String>,
) -> Result<Tombstone, BackupError> {
    match (public_key, secret_sha256) {
        (Some(pk), None) => Ok(Tombstone::PublicKey(pk)),
        (None, Some(hash)) => {
            let mut out = [0u8; 32];
            hex::decode_to_slice(&hash, &mut out)
                .map_err(|_| format_error(n, "a secret tombstone that is not 64 hex digits"))?;
            Ok(Tombstone::Secret(out))
        }
        _ => Err(format_error(
            n,
            "a tombstone names one public key or one secret hash",
        )),
    }
}

/// What a restore did.
#[derive(Debug, Default)]
pub struct RestoreReport {
    /// Keys and audit entries added, and those already there.
    pub copy: CopyReport,
    pub credits_restored: usize,
    /// The keyring was written (the store had none); `false` with a keyring in the backup:
    /// the store's own was kept.
    pub signing_keys_restored: bool,
}

/// Checks a whole backup without writing anything: every line parses, the header names this
/// format, and the last line's counts match what came before it.
pub fn verify(input: &mut dyn BufRead) -> Result<Counts, BackupError> {
    let mut seen = Counts::default();
    let mut end = None;
    let mut lines = Lines::new(input);
    while let Some((n, line)) = lines.next_line()? {
        if end.is_some() {
            return Err(format_error(n, "lines after the end line"));
        }
        match line {
            Line::Header { format, .. } if n == 1 && format == FORMAT => {}
            Line::Header { format, .. } if n == 1 => {
                return Err(format_error(
                    n,
                    &format!("backup format {format}; this keygate reads {FORMAT}"),
                ))
            }
            _ if n == 1 => return Err(format_error(n, "not a keygate backup (no header)")),
            Line::Header { .. } => return Err(format_error(n, "a second header")),
            Line::Key(_) => seen.keys += 1,
            Line::Audit(_) => seen.audit += 1,
            Line::Credits { .. } => seen.credits += 1,
            Line::Tombstone {
                public_key,
                secret_sha256,
            } => match tombstone(n, public_key, secret_sha256)? {
                Tombstone::PublicKey(_) => seen.tombstones += 1,
                Tombstone::Secret(_) => seen.secret_tombstones += 1,
            },
            Line::SigningKeys { .. } => seen.signing_keys = true,
            Line::End(counts) => end = Some((n, counts)),
        }
    }
    match end {
        Some((_, counts)) if counts == seen => Ok(seen),
        Some((n, counts)) => Err(format_error(
            n,
            &format!("the end line counts {counts:?} but the file holds {seen:?}"),
        )),
        None => Err(format_error(
            lines.read,
            "no end line: the backup is cut short",
        )),
    }
}

/// Restores a backup that [`verify`] accepted (call it on the same bytes first), one line
/// at a time.
pub async fn restore(
    stores: &Stores,
    input: &mut dyn BufRead,
) -> Result<RestoreReport, BackupError> {
    let mut report = RestoreReport::default();
    // Which keys this run added: only their credits are set, so a re-run never overwrites
    // the counter of a key that has been spending since.
    let mut added = std::collections::HashSet::new();
    let mut lines = Lines::new(input);
    while let Some((n, line)) = lines.next_line()? {
        apply(stores, n, line, &mut report, &mut added).await?;
    }
    stores.keys.flush().await?;
    Ok(report)
}

async fn apply(
    stores: &Stores,
    n: usize,
    line: Line,
    report: &mut RestoreReport,
    added: &mut std::collections::HashSet<String>,
) -> Result<(), BackupError> {
    match line {
        Line::Header { .. } | Line::End(_) => {}
        Line::Key(record) => {
            if copy_key(&record, stores.keys.as_ref(), &mut report.copy).await? {
                added.insert(record.id.clone());
            }
        }
        Line::Audit(entry) => {
            copy_audit(&entry, stores.keys.as_ref(), &mut report.copy).await?;
        }
        Line::Credits {
            key_id,
            remaining,
            period,
        } => {
            if added.contains(&key_id) {
                // Stored with the period it was read in: a refill due since then still
                // happens at the key's next request.
                let refill = period.map(|period| RefillNow { period, amount: 0 });
                stores
                    .credits
                    .adjust(&key_id, CreditOp::Set(remaining), refill)
                    .await?;
                report.credits_restored += 1;
            }
        }
        Line::Tombstone {
            public_key,
            secret_sha256,
        } => match tombstone(n, public_key, secret_sha256)? {
            Tombstone::PublicKey(public_key) => {
                stores.keys.add_tombstone(&public_key).await?;
                report.copy.tombstones += 1;
            }
            Tombstone::Secret(hash) => {
                stores.keys.add_secret_tombstone(&hash).await?;
                report.copy.secret_tombstones += 1;
            }
        },
        Line::SigningKeys { body } => {
            // Version 1 is written only where there is no keyring (compare-and-set): a store
            // with one of its own, or a gateway that created one meanwhile, keeps it.
            let doc = Versioned {
                version: 1,
                body: serde_json::to_vec(&body).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            };
            match stores.signing_keys.save_signing_keys(&doc).await {
                Ok(()) => report.signing_keys_restored = true,
                Err(StoreError::VersionConflict) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

fn format_error(line: usize, reason: &str) -> BackupError {
    BackupError::Format {
        line,
        reason: reason.to_owned(),
    }
}

/// The lines of a backup, parsed, numbered from 1.
struct Lines<'a> {
    input: &'a mut dyn BufRead,
    buf: String,
    read: usize,
}

impl<'a> Lines<'a> {
    fn new(input: &'a mut dyn BufRead) -> Self {
        Self {
            input,
            buf: String::new(),
            read: 0,
        }
    }

    fn next_line(&mut self) -> Result<Option<(usize, Line)>, BackupError> {
        self.buf.clear();
        if self.input.read_line(&mut self.buf)? == 0 {
            return Ok(None);
        }
        self.read += 1;
        let n = self.read;
        serde_json::from_str(self.buf.trim_end())
            .map(|line| Some((n, line)))
            .map_err(|e| format_error(n, &e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(text: &str) -> Result<Counts, BackupError> {
        verify(&mut text.as_bytes())
    }

    const HEAD: &str =
        r#"{"header":{"format":1,"created_at":"2026-12-03T00:00:00Z","keygate":"t"}}"#;

    #[test]
    fn a_tombstone_line_names_one_public_key_or_one_secret_hash() {
        let hash = "ab".repeat(32);
        let good = format!(
            "{HEAD}\n{{\"tombstone\":{{\"public_key\":\"pk_live_x\"}}}}\n\
             {{\"tombstone\":{{\"secret_sha256\":\"{hash}\"}}}}\n\
             {{\"end\":{{\"keys\":0,\"audit\":0,\"credits\":0,\"signing_keys\":false,\
             \"tombstones\":1,\"secret_tombstones\":1}}}}\n"
        );
        let c = counts(&good).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((c.tombstones, c.secret_tombstones), (1, 1));
        for bad in [
            format!("{{\"public_key\":\"pk_live_x\",\"secret_sha256\":\"{hash}\"}}"),
            "{}".to_owned(),
            "{\"secret_sha256\":\"abc\"}".to_owned(),
        ] {
            let text = format!("{HEAD}\n{{\"tombstone\":{bad}}}\n");
            match counts(&text) {
                Err(BackupError::Format { line: 2, .. }) => {}
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
