//! Copying one store into another (`keygate store copy`): growing from one node to a fleet.

use super::audit::AuditEntry;
use super::embedded::EmbeddedStore;
use super::model::KeyRecord;
use super::store::{KeyStore, StoreError, Usage, Write};

/// What a copy did. Running it again copies nothing twice: keys and audit entries already in
/// the target are left as they are, and a used nonce stays used.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CopyReport {
    pub keys_copied: usize,
    /// Already in the target, the same as in the source.
    pub keys_present: usize,
    /// Ids already in the target with different contents: the target's version is kept (it
    /// may be newer — a key revoked on the fleet must stay revoked).
    pub keys_differing: Vec<String>,
    /// Ids whose public key or bearer hash belongs to another key in the target: not copied.
    pub keys_conflicting: Vec<String>,
    pub audit_copied: usize,
    pub audit_present: usize,
    /// Nonces still inside their window, now used in the target too.
    pub nonces: usize,
    /// Public keys of revoked keys (deleted ones included), now refused for import there too.
    pub tombstones: usize,
    /// Hashes of revoked bearer keys' secrets, now refused for import there too.
    pub secret_tombstones: usize,
}

const PAGE: usize = 500;

/// Copies every key (sealed secrets as they are, usage counters included), every audit entry
/// and every live nonce from `from` into `to`. Stops at the first store error; what was copied
/// by then stays, and a re-run completes it.
pub async fn copy_store(from: &EmbeddedStore, to: &dyn KeyStore) -> Result<CopyReport, StoreError> {
    let mut report = CopyReport::default();
    let mut records = Walk::new(from);
    while let Some(page) = records.next_records().await? {
        for record in &page {
            copy_key(record, to, &mut report).await?;
        }
    }
    let mut audit = Walk::new(from);
    while let Some(page) = audit.next_audit().await? {
        for entry in &page {
            copy_audit(entry, to, &mut report).await?;
        }
    }
    for public_key in from.tombstones().await? {
        to.add_tombstone(&public_key).await?;
        report.tombstones += 1;
    }
    for hash in from.secret_tombstones().await? {
        to.add_secret_tombstone(&hash).await?;
        report.secret_tombstones += 1;
    }
    for (key_id, nonce, left) in from.live_nonces().await? {
        to.use_nonce(&key_id, &nonce, left).await?;
        report.nonces += 1;
    }
    to.flush().await?;
    Ok(report)
}

/// Reads a whole store page by page, newest first: its key records, or (another `Walk`) its
/// audit entries.
pub struct Walk<'a> {
    store: &'a dyn KeyStore,
    cursor: Option<String>,
    done: bool,
}

impl<'a> Walk<'a> {
    pub fn new(store: &'a dyn KeyStore) -> Self {
        Self {
            store,
            cursor: None,
            done: false,
        }
    }

    /// The next page of key records; `None` after the last.
    pub async fn next_records(&mut self) -> Result<Option<Vec<KeyRecord>>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let page = self.store.list(None, self.cursor.as_deref(), PAGE).await?;
        self.advance(page.next_cursor);
        Ok(Some(page.items))
    }

    /// The next page of audit entries; `None` after the last.
    pub async fn next_audit(&mut self) -> Result<Option<Vec<AuditEntry>>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let page = self
            .store
            .list_audit(None, None, self.cursor.as_deref(), PAGE)
            .await?;
        self.advance(page.next_cursor);
        Ok(Some(page.items))
    }

    fn advance(&mut self, next: Option<String>) {
        self.done = next.is_none();
        self.cursor = next;
    }
}

/// Adds `record` to `to` with its usage counters unless its id is there already (then the
/// target's version is kept); `true` if it was added.
pub async fn copy_key(
    record: &KeyRecord,
    to: &dyn KeyStore,
    report: &mut CopyReport,
) -> Result<bool, StoreError> {
    if let Some(there) = to.get_by_id(&record.id).await? {
        if without_usage(&there) == without_usage(record) {
            report.keys_present += 1;
        } else {
            report.keys_differing.push(record.id.clone());
        }
        return Ok(false);
    }
    match to.write(Write::Insert(record), None).await {
        Ok(_) => {}
        Err(StoreError::Conflict) => {
            report.keys_conflicting.push(record.id.clone());
            return Ok(false);
        }
        Err(e) => return Err(e),
    }
    // Counters go in only with the record, so a re-run never adds them twice.
    if let (n @ 1.., Some(at)) = (record.total_requests, record.last_used_at) {
        // The embedded insert kept the record's own counters; Redis keeps them apart.
        let there = to.get_by_id(&record.id).await?;
        if there.is_some_and(|r| r.total_requests == 0) {
            let usage = Usage {
                requests: n,
                last_used_at: at,
            };
            to.add_usage(&[(record.id.clone(), usage)]).await?;
        }
    }
    report.keys_copied += 1;
    Ok(true)
}

pub async fn copy_audit(
    entry: &AuditEntry,
    to: &dyn KeyStore,
    report: &mut CopyReport,
) -> Result<(), StoreError> {
    if to.import_audit(entry).await? {
        report.audit_copied += 1;
    } else {
        report.audit_present += 1;
    }
    Ok(())
}

fn without_usage(record: &KeyRecord) -> KeyRecord {
    KeyRecord {
        total_requests: 0,
        last_used_at: None,
        ..record.clone()
    }
}
