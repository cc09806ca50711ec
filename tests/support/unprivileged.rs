//! Running a command as another (non-root) uid, as systemd's `DynamicUser` or a container's
//! `USER` would: `setpriv --reuid --regid --clear-groups` when the tests run as root; when
//! they do not, the command runs as the test's own user and the caller says what that skips.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

/// Why the tests cannot switch to another uid, or `None` when they can.
pub fn cannot_switch() -> Option<String> {
    let euid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if euid != Some(0) {
        return Some(format!(
            "the tests run as uid {euid:?}, not root: setpriv cannot switch to another uid, so \
             the non-root part runs as the test's own user"
        ));
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        return Some("setpriv (util-linux) is not installed".to_owned());
    }
    None
}

/// `program` to be run as `uid:gid` with no supplementary groups (as root), else as is.
pub fn command(uid: u32, gid: u32, program: &Path) -> Command {
    if cannot_switch().is_some() {
        return Command::new(program);
    }
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(program);
    c
}

/// Gives `path` to `uid:gid` (when root) and sets its mode.
pub fn own(path: &Path, uid: u32, gid: u32, mode: u32) {
    if cannot_switch().is_none() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// The mode bits of `path`.
pub fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}
