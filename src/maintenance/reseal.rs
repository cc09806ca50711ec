//! Master-key rotation: re-seal every `hmac-*` secret and assertion seed under a new master
//! key while gateways keep serving, and count what is sealed under which key.
//!
//! Each record is moved on its own with a compare-and-set write, so a run that stops half way
//! leaves every record readable (under the old key or the new) and a second run finishes the
//! rest; a record already under the new key is left alone, so running it again changes
//! nothing. Gateways must hold both keys for the length of the rotation
//! (`secrets.previous_master_key_file`), or a record moved under a key they lack stops opening.

use std::collections::BTreeMap;

use crate::assertion::keyring;
use crate::assertion::KeyringError;
use crate::keys::{
    KeyRecord, KeyStore, MasterKey, SigningKeyStore, StoreError, StoredCredential, Walk,
};

/// Compare-and-set attempts per record before it is reported as contended.
const CAS_ATTEMPTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ResealError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Keyring(#[from] KeyringError),
}

/// How many secrets are sealed under one master key id.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Keys' current `hmac-*` secrets.
    pub key_secrets: usize,
    /// Secrets still in a rotation's grace period (`previous` on the record).
    pub grace_secrets: usize,
    /// Assertion signing-key seeds.
    pub signing_keys: usize,
}

/// What `keygate secrets status` shows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SealStatus {
    pub by_master_key: BTreeMap<String, Sealed>,
    /// `bearer` keys: stored as a hash, no master key involved.
    pub bearer_keys: usize,
}

/// Counts every sealed secret of the store by the master key it is sealed under.
pub async fn status(
    keys: &dyn KeyStore,
    signing: &dyn SigningKeyStore,
) -> Result<SealStatus, ResealError> {
    let mut out = SealStatus::default();
    let mut walk = Walk::new(keys);
    while let Some(page) = walk.next_records().await? {
        for record in &page {
            count(&mut out, record);
        }
    }
    if let Some(doc) = signing.load_signing_keys().await? {
        for id in keyring::sealed_under(&doc)? {
            out.by_master_key.entry(id).or_default().signing_keys += 1;
        }
    }
    Ok(out)
}

fn count(out: &mut SealStatus, record: &KeyRecord) {
    match &record.credential {
        StoredCredential::Sealed(s) => {
            out.by_master_key
                .entry(s.master_key_id.clone())
                .or_default()
                .key_secrets += 1;
        }
        StoredCredential::Sha256 { .. } => out.bearer_keys += 1,
    }
    if let Some(StoredCredential::Sealed(s)) = record.previous.as_ref().map(|p| &p.credential) {
        out.by_master_key
            .entry(s.master_key_id.clone())
            .or_default()
            .grace_secrets += 1;
    }
}

/// What a reseal did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResealReport {
    /// Records re-sealed under the new key by this run.
    pub keys_resealed: usize,
    /// Records already under the new key (or with nothing sealed: bearer keys).
    pub keys_already: usize,
    /// Records that could not be opened with the loaded keys, and why: left as they are.
    pub keys_failed: Vec<(String, String)>,
    /// Assertion seeds re-sealed.
    pub signing_keys_resealed: usize,
}

/// Re-seals every secret not sealed under `master`'s current key. `master` must also hold
/// (as previous keys) every key the store's secrets are sealed under now.
pub async fn reseal(
    keys: &dyn KeyStore,
    signing: &dyn SigningKeyStore,
    master: &MasterKey,
) -> Result<ResealReport, ResealError> {
    let mut report = ResealReport::default();
    let mut walk = Walk::new(keys);
    while let Some(page) = walk.next_records().await? {
        for record in page {
            reseal_one(keys, master, record, &mut report).await?;
        }
    }
    report.signing_keys_resealed = keyring::reseal(signing, master).await?;
    keys.flush().await?;
    Ok(report)
}

/// Re-seals `listed` as the listing read it; only after a concurrent change is the record
/// read again.
async fn reseal_one(
    keys: &dyn KeyStore,
    master: &MasterKey,
    listed: KeyRecord,
    report: &mut ResealReport,
) -> Result<(), StoreError> {
    let id = listed.id.clone();
    let mut next = Some(listed);
    for _ in 0..CAS_ATTEMPTS {
        let current = match next.take() {
            Some(r) => Some(r),
            None => keys.get_by_id(&id).await?,
        };
        // Deleted since the listing: nothing to move.
        let Some(mut record) = current else {
            return Ok(());
        };
        match resealed(&mut record, master) {
            Ok(false) => {
                report.keys_already += 1;
                return Ok(());
            }
            Ok(true) => {}
            Err(e) => {
                report.keys_failed.push((id, e.to_string()));
                return Ok(());
            }
        }
        record.version += 1;
        match keys.update(&record).await {
            Ok(()) => {
                report.keys_resealed += 1;
                return Ok(());
            }
            Err(StoreError::VersionConflict) => continue,
            Err(StoreError::NotFound) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    report
        .keys_failed
        .push((id, "kept changing under this run; run it again".into()));
    Ok(())
}

/// Moves the record's sealed credentials under `master`'s current key; `false` if none
/// needed it. The record's `updated_at` stays: the key itself did not change.
fn resealed(
    record: &mut KeyRecord,
    master: &MasterKey,
) -> Result<bool, crate::keys::secret::SecretError> {
    let id = record.id.clone();
    let mut moved = false;
    let previous = record.previous.as_mut().map(|p| &mut p.credential);
    for credential in std::iter::once(&mut record.credential).chain(previous) {
        if let StoredCredential::Sealed(sealed) = credential {
            if sealed.master_key_id != master.id() {
                let secret = master.open(sealed, &id)?;
                *sealed = master.seal(&secret, &id);
                moved = true;
            }
        }
    }
    Ok(moved)
}
