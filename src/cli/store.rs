//! `keygate store copy` (grow an embedded node into a Redis fleet), `store backup` and
//! `store restore`.

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
                "keys: {} copied, {} already there; audit entries: {} copied, {} already there; live nonces: {}; revoked public keys: {}; revoked bearer secrets: {}",
                r.keys_copied, r.keys_present, r.audit_copied, r.audit_present, r.nonces, r.tombstones, r.secret_tombstones
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

/// Opens the config's store for a tool run, with a runtime to drive it; prints why not.
pub(super) fn open(
    config: &crate::Config,
    what: &str,
) -> Result<(crate::server::Stores, tokio::runtime::Runtime), ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("keygate {what}: runtime: {e}");
            ExitCode::from(EX_UNAVAILABLE)
        })?;
    let stores = crate::server::open_store(config).map_err(|e| {
        eprintln!("keygate {what}: {e}");
        if matches!(config.store, crate::config::StoreConfig::Embedded { .. }) {
            eprintln!(
                "  an embedded store opens in one process at a time: stop the gateway \
                     using it first"
            );
        }
        ExitCode::from(EX_UNAVAILABLE)
    })?;
    Ok((stores, rt))
}

/// `keygate store backup --to FILE`: writes a new file (never over an old backup), mode 0600.
pub(super) fn backup(config: &crate::Config, to: &std::path::Path) -> ExitCode {
    use std::io::Write;
    // Written beside the target and renamed at the end: a failed backup leaves no file that
    // looks whole.
    if to.exists() {
        eprintln!(
            "keygate store backup: {} exists; pick a new name",
            to.display()
        );
        return ExitCode::from(EX_USAGE);
    }
    let (stores, rt) = match open(config, "store backup") {
        Ok(s) => s,
        Err(code) => return code,
    };
    // A dated backup path (`backups/2026-12-03/keygate.jsonl`) names a directory that does not
    // exist yet: make it private, as the backup it will hold — once the store has opened, so a
    // refused backup leaves nothing behind.
    if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
        use std::os::unix::fs::DirBuilderExt;
        if let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
        {
            eprintln!("keygate store backup: {}: {e}", parent.display());
            return ExitCode::from(EX_USAGE);
        }
    }
    let mut partial = to.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    let file = match std::fs::File::create(&partial) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("keygate store backup: {}: {e}", partial.display());
            return ExitCode::from(EX_USAGE);
        }
    };
    if let Err(e) = crate::keys::owner_only(&partial, 0o600) {
        eprintln!("keygate store backup: {}: {e}", partial.display());
        return ExitCode::from(EX_UNAVAILABLE);
    }
    let mut out = std::io::BufWriter::new(file);
    let now = time::OffsetDateTime::now_utc();
    let result = rt
        .block_on(crate::maintenance::backup::backup(&stores, &mut out, now))
        .and_then(|counts| {
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            std::fs::rename(&partial, to)?;
            Ok(counts)
        });
    match result {
        Ok(c) => {
            println!(
                "{}: {} keys, {} audit entries, {} credit counters, assertion keyring: {}, \
                 {} revoked public keys, {} revoked bearer secrets",
                to.display(),
                c.keys,
                c.audit,
                c.credits,
                if c.signing_keys { "yes" } else { "none" },
                c.tombstones,
                c.secret_tombstones
            );
            let _ = std::io::stdout().flush();
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            eprintln!("keygate store backup: {e}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

/// `keygate store restore --from FILE`: checks the whole file, then adds what the store lacks.
pub(super) fn restore(config: &crate::Config, from: &std::path::Path) -> ExitCode {
    use crate::maintenance::backup;
    const EX_DATAERR: u8 = 65;
    let reader = || std::fs::File::open(from).map(std::io::BufReader::new);
    let counts = match reader()
        .map_err(backup::BackupError::from)
        .and_then(|mut r| backup::verify(&mut r))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "keygate store restore: {}: {e}; nothing restored",
                from.display()
            );
            return ExitCode::from(EX_DATAERR);
        }
    };
    let (stores, rt) = match open(config, "store restore") {
        Ok(s) => s,
        Err(code) => return code,
    };
    let result = reader()
        .map_err(backup::BackupError::from)
        .and_then(|mut r| rt.block_on(backup::restore(&stores, &mut r)));
    match result {
        Ok(r) => {
            println!(
                "keys: {} restored, {} already there; audit entries: {} restored, {} already \
                 there; credit counters: {}; assertion keyring: {}; revoked public keys: {}; \
                 revoked bearer secrets: {}",
                r.copy.keys_copied,
                r.copy.keys_present + r.copy.keys_differing.len(),
                r.copy.audit_copied,
                r.copy.audit_present,
                r.credits_restored,
                match (counts.signing_keys, r.signing_keys_restored) {
                    (false, _) => "none in the backup",
                    (true, true) => "restored",
                    (true, false) => "kept the store's own",
                },
                r.copy.tombstones,
                r.copy.secret_tombstones
            );
            for id in &r.copy.keys_differing {
                println!("kept the store's version of {id}: it differs from the backup's");
            }
            for id in &r.copy.keys_conflicting {
                eprintln!("not restored: {id}: its public key or secret belongs to another key");
            }
            if r.copy.keys_conflicting.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EX_DATAERR)
            }
        }
        Err(e) => {
            eprintln!(
                "keygate store restore: {e}; run it again to finish (nothing is added twice)"
            );
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}
