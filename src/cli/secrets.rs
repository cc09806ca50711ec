//! `keygate secrets status` and `keygate secrets reseal`: master-key rotation.

use std::process::ExitCode;

use super::{SecretsCmd, EX_UNAVAILABLE, EX_USAGE};
use crate::keys::MasterKey;
use crate::maintenance::reseal;

/// The systemd credential `secrets reseal` takes the new master key from when no
/// `--new-master-key-file` is given.
const NEW_MASTER_KEY_CREDENTIAL: &str = "new-master-key";

pub(super) fn run(config: &crate::Config, command: &SecretsCmd) -> ExitCode {
    let env = |k: &str| std::env::var(k).ok();
    let loaded = crate::server::load_master_key(config, &env);
    match command {
        SecretsCmd::Status => status(config, loaded.ok().as_ref()),
        SecretsCmd::Reseal {
            new_master_key_file,
        } => {
            let loaded = match loaded {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("keygate secrets reseal: the current key: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            // Under systemd the admin's shell hands the new key over as a credential of the
            // transient unit, which the store's dynamic user can read (deploy/README.md).
            let env = |k: &str| std::env::var(k).ok();
            let Some(new_master_key_file) = new_master_key_file
                .clone()
                .or_else(|| crate::server::credential(&env, NEW_MASTER_KEY_CREDENTIAL))
            else {
                eprintln!(
                    "keygate secrets reseal: --new-master-key-file FILE is required (or the \
                     systemd credential {NEW_MASTER_KEY_CREDENTIAL})"
                );
                return ExitCode::from(EX_USAGE);
            };
            let new = match crate::keys::secret::read_private_file(&new_master_key_file) {
                Ok(Some(text)) => MasterKey::from_base64(text.expose()).map_err(|e| e.to_string()),
                Ok(None) => Err("no such file".to_owned()),
                Err(e) => Err(e),
            };
            match new {
                Ok(new) => reseal_all(config, &new.with_previous(loaded)),
                Err(e) => {
                    eprintln!(
                        "keygate secrets reseal: --new-master-key-file {}: {e}",
                        new_master_key_file.display()
                    );
                    ExitCode::from(EX_USAGE)
                }
            }
        }
    }
}

fn status(config: &crate::Config, loaded: Option<&MasterKey>) -> ExitCode {
    let (stores, rt) = match super::store::open(config, "secrets status") {
        Ok(s) => s,
        Err(code) => return code,
    };
    let counted = rt.block_on(reseal::status(
        stores.keys.as_ref(),
        stores.signing_keys.as_ref(),
    ));
    let status = match counted {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keygate secrets status: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    let role = |id: &str| match loaded {
        Some(k) if k.id() == id => "current",
        Some(k) if k.can_open(id) => "previous",
        Some(_) => "NOT LOADED",
        None => "?",
    };
    if status.by_master_key.is_empty() {
        println!("nothing sealed yet");
    }
    for (id, n) in &status.by_master_key {
        println!(
            "{id} ({}): {} key secrets, {} in rotation grace, {} assertion keys",
            role(id),
            n.key_secrets,
            n.grace_secrets,
            n.signing_keys
        );
    }
    println!(
        "bearer keys (hashed, no master key): {}",
        status.bearer_keys
    );
    match loaded {
        Some(k) => {
            let pending = status
                .by_master_key
                .keys()
                .filter(|id| id.as_str() != k.id())
                .count();
            if pending == 0 {
                println!("everything is sealed under the current key {}", k.id());
            } else {
                println!(
                    "{pending} other master key id(s) still hold secrets: run `keygate secrets reseal`"
                );
            }
        }
        None => println!("(no master key loaded from this config: roles not shown)"),
    }
    ExitCode::SUCCESS
}

fn reseal_all(config: &crate::Config, master: &MasterKey) -> ExitCode {
    const EX_DATAERR: u8 = 65;
    let (stores, rt) = match super::store::open(config, "secrets reseal") {
        Ok(s) => s,
        Err(code) => return code,
    };
    let result = rt.block_on(reseal::reseal(
        stores.keys.as_ref(),
        stores.signing_keys.as_ref(),
        master,
    ));
    match result {
        Ok(r) => {
            println!(
                "under {}: {} key records re-sealed, {} already there; {} assertion keys re-sealed",
                master.id(),
                r.keys_resealed,
                r.keys_already,
                r.signing_keys_resealed
            );
            for (id, why) in &r.keys_failed {
                eprintln!("not re-sealed: {id}: {why}");
            }
            if r.keys_failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EX_DATAERR)
            }
        }
        Err(e) => {
            eprintln!("keygate secrets reseal: {e}; run it again to finish");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}
