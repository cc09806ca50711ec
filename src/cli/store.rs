//! `keygate store copy`: grow an embedded node into a Redis fleet.

use std::process::ExitCode;

use super::{EX_UNAVAILABLE, EX_USAGE};

/// Copies an embedded store into Redis; prints what was copied.
pub(super) fn copy(
    from: &std::path::Path,
    to: &str,
    tls_ca_file: Option<&std::path::Path>,
) -> ExitCode {
    use crate::keys::{copy_store, EmbeddedStore, RedisStore, RedisTarget, StoreError};
    const EX_DATAERR: u8 = 65;
    let target = match RedisTarget::parse(&[to.to_owned()]) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("keygate store copy: --to {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let ca = match tls_ca_file.map(std::fs::read).transpose() {
        Ok(ca) => ca,
        Err(e) => {
            eprintln!("keygate store copy: --tls-ca-file: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if !from.is_file() {
        eprintln!(
            "keygate store copy: --from {}: no such store file",
            from.display()
        );
        return ExitCode::from(EX_USAGE);
    }
    let result = (|| -> Result<crate::keys::CopyReport, StoreError> {
        let source = EmbeddedStore::open(from)?;
        let dest = RedisStore::connect(&target, ca.as_deref())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        rt.block_on(copy_store(&source, &dest))
    })();
    match result {
        Ok(r) => {
            println!(
                "keys: {} copied, {} already there; audit entries: {} copied, {} already there; live nonces: {}",
                r.keys_copied, r.keys_present, r.audit_copied, r.audit_present, r.nonces
            );
            for id in &r.keys_differing {
                println!("kept the target's version of {id}: it differs from the source's");
            }
            for id in &r.keys_conflicting {
                eprintln!("not copied: {id}: its public key or secret belongs to another key in the target");
            }
            if r.keys_conflicting.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EX_DATAERR)
            }
        }
        Err(e) => {
            eprintln!("keygate store copy: {e}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}
